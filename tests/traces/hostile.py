"""Hostile programs: each must be contained and reported with a reason (shared by the tests)."""

HOSTILE = {
    "infinite_loop": "def f(x):\n    while True:\n        x += 1",
    "silent_loop": "def f(x):\n    return sum(range(10 ** 13))",
    "fork_bomb": "import os\ndef f(x):\n    while True:\n        os.fork()",
    "memory_bomb": "def f(x):\n    return 'a' * (10 ** 11)",
    "deep_recursion": "def f(x):\n    return f(x + 1) + 1",
    "write_outside": "def f(path):\n    open(path, 'w').write('pwned')\n    return 1",
    "read_outside": "def f(path):\n    return open(path).read()",
    "network": "import socket\ndef f(x):\n    s = socket.socket()\n    s.connect(('1.1.1.1', 80))\n"
               "    return 1",
    "stdout_flood": "def f(x):\n    print('x' * 100_000_000)\n    return 1",
    "settrace_off": "import sys\ndef f(x):\n    sys.settrace(None)\n    y = x + 1\n    return y",
    "kill_parent": "import os, signal\ndef f(x):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                   "    return 1",
    "os_exit": "import os\ndef f(x):\n    os._exit(0)",
}


def hostile_input(name: str, host_dir: str) -> str:
    if name == "write_outside":
        return repr(f"{host_dir}/pwned.txt")
    if name == "read_outside":
        return repr(f"{host_dir}/secret.txt")
    return "1"
