"""A launch server for bench/launch_bench.py: the supervisor's zygote (DESIGN.md §5) or a "fat" process.

    /usr/bin/python3 -I -S bench/launch_zygote.py REPLY_FD PKG_ROOT SPEC.json          # zygote (lean)
    .venv/bin/python bench/launch_zygote.py --fat REPLY_FD PKG_ROOT SPEC.json   # fat (full CLI + threads)

Protocol: one request per line on stdin (a JSON list: the argv), one reply per line on REPLY_FD (the
agent's exit status, or "E <message>" when the sandbox refused). Per request the server forks C1, which
runs `launch(spec, argv)` and _exits with its status; the server waits for C1 and replies. The spec is
parsed once at start-up, and the imports and BPF are held for the server's lifetime: that is what the
zygote buys. The agent's stdio (and the enforcement report) go to the server's stdout/stderr.

`--fat` stands in for forking from the full supervisor: the CLI, the engine, lark and cryptography are
imported, two threads are running (one holding the GIL in short bursts), and then launches are forked
from that process. This exists only to show why the supervisor never forks from itself.
"""

from __future__ import annotations

import json
import os
import sys


def _fatten() -> str:
    import threading
    import time

    import cryptography.hazmat.primitives.hashes  # noqa: F401
    import lark  # noqa: F401
    from faramesh.engine.policy import compiler, evaluate  # noqa: F401
    from faramesh.launchers import cli  # noqa: F401

    stop = threading.Event()

    def idle() -> None:
        stop.wait()

    def ticker() -> None:
        n = 0
        while not stop.is_set():
            n += sum(range(200))
            time.sleep(0.001)

    for target in (idle, ticker):
        threading.Thread(target=target, daemon=True).start()
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "Threads:")):
                rss_line = line.split()
                if rss_line[0] == "VmRSS:":
                    rss = int(rss_line[1])
    return f"fat: rss {rss // 1024} MiB, threads {threading.active_count()}, modules {len(sys.modules)}"


def main() -> int:
    args = sys.argv[1:]
    fat = bool(args) and args[0] == "--fat"
    if fat:
        args = args[1:]
    reply_fd, pkg_root, spec_path = int(args[0]), args[1], args[2]
    if not fat:
        sys.path.insert(0, pkg_root)
    info = _fatten() if fat else f"zygote: modules {len(sys.modules)}"
    from faramesh.sandbox import launch as sandbox_launch
    from faramesh.sandbox.errors import SandboxError

    with open(spec_path, "rb") as f:
        spec = sandbox_launch.spec_from_json(f.read())
    if not fat:
        info = f"zygote: modules {len(sys.modules)}"
    reply = os.fdopen(reply_fd, "w", buffering=1)
    reply.write(f"READY {info}\n")
    for line in sys.stdin:
        argv = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 125
            try:
                os.close(reply_fd)
                os.close(0)
                os.open("/dev/null", os.O_RDONLY)  # fd 0 again
                code = sandbox_launch.launch(spec, argv)
            except SandboxError as e:
                os.write(2, f"launch refused: {e.code}: {e}\n".encode())
                code = 4
            except BaseException as e:  # never let the child return into the server loop
                os.write(2, f"launch crashed: {e!r}\n".encode())
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        reply.write(f"{code}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
