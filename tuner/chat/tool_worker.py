"""One tool call in a process of its own, bounded in memory and CPU time: `Toolbox.run` starts it
with the call on stdin and reads {"result": ...} or {"error": ...} from stdout. Whatever the call
does (a 40 MB integer, a sympy solve that never ends, a recursion 2,000 deep), `tuner chat` goes on.

    echo '{"name": "calculate", "value": "6*7", "seconds": 10, "memory": 2147483648}' | python -m tuner.chat.tool_worker
"""

from __future__ import annotations

import json
import resource
import sys


def main() -> int:
    request = json.loads(sys.stdin.read())
    memory, seconds = int(request["memory"]), int(request["seconds"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))  # a MemoryError here, not the machine's swap
    resource.setrlimit(resource.RLIMIT_CPU, (seconds + 1, seconds + 1))  # the parent's timeout is the first line
    sys.setrecursionlimit(10_000)
    from tuner.chat.tools import RUNNERS, ToolError

    try:
        answer = {"result": RUNNERS[request["name"]][1](request["value"])}
    except ToolError as e:
        answer = {"error": str(e)}
    except RecursionError:
        answer = {"error": "the input is nested too deeply"}
    except MemoryError:
        answer = {"error": f"the result needs more than {memory >> 20} MiB"}
    except Exception as e:  # noqa: BLE001 - sympy and math raise many types; each becomes the model's result
        answer = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(answer, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
