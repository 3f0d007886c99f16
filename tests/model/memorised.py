"""What the session's trained debug checkpoint (``trained_checkpoint`` in conftest) learns to
say: a chat reply that calls a tool, and a code completion."""

BASH_TOOL = {"type": "function", "function": {
    "name": "bash", "description": "Run a bash command.",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                   "required": ["command"]}}}
CHAT_PROMPT = [{"role": "user", "content": "List the files."}]
CHAT_REPLY = '<tool: bash>\n{"command": "ls -la"}\n</tool><|eot_id|>'
COMPLETION_PROMPT = "def add(a, b):\n"
COMPLETION_REPLY = "    return a + b\n<|end_of_text|>"
