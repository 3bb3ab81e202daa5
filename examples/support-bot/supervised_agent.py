"""agent.py as a supervised program (`make demo` as root: `agent "support-bot" { command = "…" }`).

The supervisor restarts an agent that exits, so the one-shot smoke test of agent.py would run again and
again. This wrapper runs it once, prints its verdict (`smoke test exit N`), then idles until the
supervisor stops it (`faramesh apply --stop` sends SIGINT first), exiting with the smoke test's status.
The single-file client `faramesh_client.py` sits next to this file in the stack copy: the script's
directory is first on sys.path, so `python3 -S` finds it without PYTHONPATH (the sandbox strips it).
"""

from __future__ import annotations

import signal
import sys
import threading

import agent  # agent.py, next to this file


def main(argv: list[str]) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    rc = agent.main(argv)
    sys.stdout.write(f"smoke test exit {rc}; idling until the supervisor stops this agent\n")
    sys.stdout.flush()
    while not stop.wait(3600):
        pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
