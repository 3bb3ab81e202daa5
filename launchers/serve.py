"""`faramesh serve --dir DIR [--policy FILE]`: the production engine alone, without typer.

Reads the installed compiled policy (the state-dir copy `apply` writes, or `--policy FILE`), never
governance.fms. Exit codes: 0 drained after SIGTERM, 1 refused (broken WAL chain), 4 runtime
failure (another engine holds the stack, not READY in time), 64 usage error, 70 internal error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"faramesh serve: {message}\n")
        raise SystemExit(64)


def main(argv: list[str]) -> int:
    parser = _Parser(prog="faramesh serve", description="Run the production engine for a stack.")
    parser.add_argument("--dir", type=Path, default=None, help="stack directory")
    parser.add_argument(
        "--policy", type=Path, default=None, help="compiled policy to serve (default: the installed copy)"
    )
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from faramesh.engine.policy.errors import FarameshError
    from faramesh.engine.policy.stack import find_stack_dir
    from faramesh.engine.runner import EngineStartError, acquire_engine_lock, run, serve_server, stack_paths

    stack = ns.dir or find_stack_dir(Path.cwd())
    if stack is None:
        sys.stderr.write("faramesh serve: no stack here; pass --dir\n")
        return 64
    paths = stack_paths(stack)
    try:
        lock = acquire_engine_lock(paths)
        server = serve_server(stack, paths, ns.policy)
    except (EngineStartError, FarameshError, OSError) as exc:
        sys.stderr.write(f"faramesh serve: {exc}\n")
        return 4 if isinstance(exc, EngineStartError | OSError) else int(getattr(exc, "exit_code", 1))
    try:
        return run(server)
    finally:
        lock.close()
