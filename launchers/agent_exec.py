"""The lean launcher: `python3 -I -S -m faramesh.launchers.agent_exec --spec SPEC.json [--report-fd N] -- cmd…`

This process becomes C1 of DESIGN.md §5 (as root: R1–R3 first; unprivileged: from S1) and exits with the
agent's status. It imports only os, sys, json and the sandbox's per-launch modules (ctypes, struct): no
lark, typer, yaml, cryptography, orjson or pyseccomp (the BPF comes precompiled, base64 in the spec).

`-S` means no site-packages on sys.path: whoever execs this (the `.faramesh/bin/agent` shim, the zygote,
tests) puts the directory holding the `faramesh` package on sys.path explicitly.

With a terminal on stdin the agent gets a new pty and this process relays (launchers/pty_relay.py): the
agent never holds the operator's terminal.

Exit status: the agent's (128+signal if it was killed); 4 when the sandbox refused to start (the reason,
with its stable code, on stderr: nothing was exec'd); 64 on a usage error.
"""

from __future__ import annotations

import os
import sys

USAGE = "usage: agent_exec --spec SPEC.json [--report-fd N] -- command [args…]"
EXIT_REFUSED = 4
EXIT_USAGE = 64


def _parse(args: list[str]) -> tuple[str, int | None, list[str]]:
    spec_path: str | None = None
    report_fd: int | None = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return _need(spec_path), report_fd, args[i + 1:]
        if a == "--spec" and i + 1 < len(args):
            spec_path = args[i + 1]
            i += 2
        elif a == "--report-fd" and i + 1 < len(args) and args[i + 1].isdigit():
            report_fd = int(args[i + 1])
            i += 2
        else:
            raise ValueError(f"unexpected argument {a!r}")
    raise ValueError("missing `--` before the command")


def _need(spec_path: str | None) -> str:
    if spec_path is None:
        raise ValueError("--spec is required")
    return spec_path


def main(args: list[str] | None = None) -> int:
    try:
        spec_path, report_fd, argv = _parse(sys.argv[1:] if args is None else args)
        if not argv:
            raise ValueError("no command given")
    except ValueError as e:
        sys.stderr.write(f"agent_exec: {e}\n{USAGE}\n")
        return EXIT_USAGE
    from faramesh.sandbox import launch as sandbox_launch
    from faramesh.sandbox.errors import SandboxError

    try:
        fd = os.open(spec_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = b""
            while chunk := os.read(fd, 1 << 16):
                raw += chunk
        finally:
            os.close(fd)
    except OSError as e:
        sys.stderr.write(f"agent_exec: cannot read spec {spec_path}: {e.strerror}\n")
        return EXIT_REFUSED
    try:
        spec = sandbox_launch.spec_from_json(raw)
        sys.stdout.flush()
        sys.stderr.flush()
        if any(os.isatty(fd) for fd in (0, 1, 2)):  # never hand the operator's terminal to the agent: a pty
            from faramesh.launchers.pty_relay import run_with_pty

            return run_with_pty(lambda: sandbox_launch.launch(spec, argv, report_fd=report_fd))
        return sandbox_launch.launch(spec, argv, report_fd=report_fd)
    except SandboxError as e:
        sys.stderr.write(f"agent_exec: sandbox refused to start: {e.code}: {e}\n")
        return EXIT_REFUSED


def run() -> None:
    """BOOT's entry: main(), then _exit with its status once stdio is flushed. The launcher has nothing
    left to clean up (C2 is reaped, every fd is the kernel's to close), so interpreter finalisation (module
    teardown, GC) would only add to every launch."""
    try:
        code = main()
    except SystemExit as e:  # pragma: no cover - main() returns its status
        code = e.code if isinstance(e.code, int) else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
