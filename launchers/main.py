"""The `faramesh` console script. Routes the long-running engine entry points to a lean parser
before typer is imported (DESIGN.md §1: typer is never imported by `serve`); everything else goes to
the typer CLI in launchers/cli.py."""

from __future__ import annotations

import sys

LEAN_COMMANDS = ("serve", "supervise")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in LEAN_COMMANDS and not {"-h", "--help"} & set(args[1:]):
        if args[0] == "supervise":
            from faramesh.supervisor.supervisor import main as supervise_main

            return supervise_main(args[1:])
        from faramesh.launchers.serve import main as serve_main

        return serve_main(args[1:])
    from faramesh.launchers.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
