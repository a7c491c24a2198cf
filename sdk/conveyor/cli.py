"""The ``conveyor`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from conveyor import __version__

SERVER_COMMANDS = {
    "server": "run the gateway and a runtime together on this machine",
    "gateway": "run the HTTP gateway alone",
    "runtime": "run a runtime worker alone (start several to scale out)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Conveyor: run Python functions on your own servers.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in SERVER_COMMANDS.items():
        commands.add_parser(
            name,
            help=text,
            description=text + ". Settings come from CONVEYOR_* variables.",
        )
    return parser


def _run_server_side(command: str) -> int:
    try:
        serve = importlib.import_module("conveyor_core.serve")
    except ImportError as exc:
        print(
            f"conveyor {command}: the server side is not installed ({exc.name} is "
            "missing); install it with: pip install 'conveyor[server]'",
            file=sys.stderr,
        )
        return 2
    return int(serve.main(command))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in SERVER_COMMANDS:
        return _run_server_side(args.command)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
