"""What the session's trained debug checkpoint (``trained_checkpoint`` in conftest) learns to
say: a chat reply that calls a tool, and a code completion."""

BASH_TOOL = {"type": "function", "function": {
    "name": "bash", "description": "Run a bash command.",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                   "required": ["command"]}}}
CHAT_PROMPT = [{"role": "user", "content": "List the files."}]
# CWM's native call body (the command itself), then <|eot_id|> (added as the token).
CHAT_REPLY = "<tool: bash>\nls -la\n</tool>"
# With reasoning on (CWM's reasoning system prompt first), the prompt ends with "<think>\n"; the
# reply closes it (CWM's format).
THINK_PROMPT = [{"role": "system", "content": "You are a helpful AI assistant. You always reason "
                 "before responding, using the following format:\n\n<think>\nyour internal "
                 "reasoning\n</think>\nyour external response"}, *CHAT_PROMPT]
THINK_REPLY = "The user wants a listing.\n</think>\n<tool: bash>\nls -la\n</tool>"
COMPLETION_PROMPT = "def add(a, b):\n"
COMPLETION_REPLY = "    return a + b\n"  # then <|end_of_text|>, the token
