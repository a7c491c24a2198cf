"""The ``conveyor`` command: run the platform, deploy and call functions."""

from __future__ import annotations

import argparse
import getpass
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from conveyor import __version__

SERVER_COMMANDS = {
    "server": "run the gateway and a runtime together on this machine",
    "gateway": "run the HTTP gateway alone",
    "runtime": "run a runtime worker alone (start several to scale out)",
}

#: Exit statuses: the remote function failed, or the command was misused.
EXIT_FAILED = 1
EXIT_USAGE = 2

_COLOURS = {
    "succeeded": "32",
    "failed": "31",
    "timed_out": "31",
    "cancelled": "33",
    "running": "36",
    "queued": "36",
}


class UsageError(Exception):
    """A mistake in the command line, reported with exit status 2."""


class Output:
    """Writes results for people (tables, colour on a terminal) or as JSON."""

    def __init__(self, as_json: bool, stream: IO[str] | None = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self.colour = self.stream.isatty() and not os.environ.get("NO_COLOR")

    def json(self, value: Any) -> None:
        self.stream.write(json.dumps(value, indent=2, sort_keys=False) + "\n")

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def status(self, status: str) -> str:
        code = _COLOURS.get(status)
        if not self.colour or code is None:
            return status
        return f"\033[{code}m{status}\033[0m"

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            self.line("(none)")
            return
        cells = [[str(value) for value in row] for row in rows]
        widths = [
            max(len(headers[column]), *(len(row[column]) for row in cells))
            for column in range(len(headers))
        ]
        header = "  ".join(
            h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)
        )
        self.line(
            f"\033[1m{header.rstrip()}\033[0m" if self.colour else header.rstrip()
        )
        for row in cells:
            shown = []
            for column, (value, width) in enumerate(zip(row, widths, strict=True)):
                padded = value.ljust(width)
                if headers[column] == "status":
                    padded = self.status(value) + " " * (width - len(value))
                shown.append(padded)
            self.line("  ".join(shown).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Conveyor: run Python functions on your own servers.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the gateway (default: CONVEYOR_URL, login)")
    common.add_argument("--key", help="the API key (default: CONVEYOR_API_KEY, login)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in SERVER_COMMANDS.items():
        commands.add_parser(
            name,
            help=text,
            description=text + ". Settings come from CONVEYOR_* variables.",
        )

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, parents=[common])

    add("login", "check a gateway URL and API key, and save them for later")

    deploy = add("deploy", "deploy the @task functions of a file, or one function")
    deploy.add_argument("path", help="a Python file")
    deploy.add_argument("--name", help="the function's name (with --entrypoint)")
    deploy.add_argument("--entrypoint", help="deploy this function of the file only")
    deploy.add_argument("--timeout-s", type=float, help="time limit in seconds")
    deploy.add_argument("--memory-mb", type=int, help="memory limit in MB")
    deploy.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="a variable"
    )

    invoke = add("invoke", "invoke a function and print its result as JSON")
    invoke.add_argument("name")
    invoke.add_argument("args", nargs="*", metavar="ARG_JSON", help="JSON arguments")
    invoke.add_argument("--kwargs", help="keyword arguments as a JSON object")
    invoke.add_argument(
        "--async", dest="background", action="store_true", help="print the id only"
    )
    invoke.add_argument("--timeout", type=float, help="seconds to wait at most")

    add("ls", "list functions")
    remove = add("rm", "remove a function and all its versions")
    remove.add_argument("name")
    status = add("status", "show an invocation")
    status.add_argument("id")
    logs = add("logs", "print what an invocation printed")
    logs.add_argument("id")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="wait for it to finish first"
    )
    listing = add("invocations", "list invocations, newest first")
    listing.add_argument("--function")
    listing.add_argument(
        "--status",
        choices=["queued", "running", "succeeded", "failed", "timed_out", "cancelled"],
    )
    listing.add_argument("--limit", type=int, default=20)

    keys = add("keys", "manage API keys (admin)")
    key_commands = keys.add_subparsers(dest="key_command", metavar="ACTION")
    create = key_commands.add_parser(
        "create", help="make a key", parents=[common], description="make a key"
    )
    create.add_argument("--tenant", required=True)
    create.add_argument(
        "--scopes",
        default="deploy,invoke,read",
        help="comma-separated: admin, deploy, invoke, read",
    )
    key_commands.add_parser("ls", help="list keys", parents=[common])
    revoke = key_commands.add_parser("revoke", help="revoke a key", parents=[common])
    revoke.add_argument("id")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in SERVER_COMMANDS:
        return _run_server_side(args.command)
    if args.command is None or (args.command == "keys" and not args.key_command):
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    from conveyor.errors import ConveyorError

    out = Output(args.json)
    try:
        return int(COMMANDS[args.command](args, out))
    except UsageError as exc:
        _fail(args, f"conveyor {args.command}: {exc}")
        return EXIT_USAGE
    except ConveyorError as exc:
        _fail(args, f"conveyor {args.command}: {_one_line(exc)}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130


def _fail(args: argparse.Namespace, message: str) -> None:
    from conveyor.errors import RemoteError

    if getattr(args, "debug", False):
        traceback.print_exc()
        remote = sys.exc_info()[1]
        if isinstance(remote, RemoteError) and remote.traceback:
            print("Remote traceback:\n" + remote.traceback.rstrip(), file=sys.stderr)
    print(message, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    from conveyor.errors import RemoteError

    if isinstance(exc, RemoteError):
        return f"{exc.type}: {exc.message}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _run_server_side(command: str) -> int:
    try:
        serve = importlib.import_module("conveyor_core.serve")
    except ImportError as exc:
        print(
            f"conveyor {command}: the server side is not installed ({exc.name} is "
            "missing); install it with: pip install 'conveyor[server]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return int(serve.main(command))


def _client(args: argparse.Namespace) -> Any:
    from conveyor.client import Client

    return Client(args.url, args.key)


# Commands.


def cmd_login(args: argparse.Namespace, out: Output) -> int:
    from conveyor import config
    from conveyor.client import Client
    from conveyor.errors import PermissionDenied

    saved = config.load_saved()
    url = args.url or os.environ.get("CONVEYOR_URL")
    if not url:
        default = saved.get("url", config.DEFAULT_URL)
        url = _ask(f"Gateway URL [{default}]: ") or default
    key = args.key or os.environ.get("CONVEYOR_API_KEY")
    if not key:
        key = getpass.getpass("API key: ").strip() if sys.stdin.isatty() else _ask("")
    if not key:
        raise UsageError("no API key given; pass --key or type it when asked")

    client = Client(url, key)
    try:
        client.invocations(limit=1)
    except PermissionDenied:
        # The key is valid; it only may not read invocations.
        pass
    path = config.save(client.url, key)
    if out.as_json:
        out.json({"url": client.url, "saved_to": str(path)})
    else:
        out.line(f"Logged in to {client.url}; saved to {path}")
    return 0


def _ask(prompt: str) -> str:
    try:
        return input(prompt).strip()
    except EOFError:
        return ""


def cmd_deploy(args: argparse.Namespace, out: Output) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    env = _env_pairs(args.env)
    client = _client(args)

    if args.entrypoint:
        targets = [(args.name or args.entrypoint, args.entrypoint, {})]
    else:
        if args.name:
            raise UsageError("--name needs --entrypoint, to say which function")
        targets = _tasks_in(path)
        if not targets:
            raise UsageError(
                f"{path} has no @task functions; decorate some with "
                "@conveyor.task or pass --entrypoint"
            )

    deployed = []
    for name, entrypoint, options in targets:
        answer = client.deploy(
            name,
            source=source,
            entrypoint=entrypoint,
            timeout_s=args.timeout_s
            if args.timeout_s is not None
            else options.get("timeout_s"),
            memory_mb=args.memory_mb
            if args.memory_mb is not None
            else options.get("memory_mb"),
            env={**options.get("env", {}), **env} or None,
        )
        deployed.append(answer)
        if not out.as_json:
            out.line(f"Deployed {answer['name']} version {answer['version']}")
    if out.as_json:
        out.json(deployed)
    return 0


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise UsageError(f"--env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _tasks_in(path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Import the file and list its tasks as (name, entrypoint, options)."""
    from conveyor.task import Task

    module_name = f"_conveyor_deploy_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(
            f"importing {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        sys.path.pop(0)
    found = []
    for attribute, value in vars(module).items():
        if isinstance(value, Task) and value.func.__module__ == module_name:
            options = {
                "timeout_s": value.timeout_s,
                "memory_mb": value.memory_mb,
                "env": value.env,
            }
            found.append((value.name, attribute, options))
    return found


def cmd_invoke(args: argparse.Namespace, out: Output) -> int:
    from conveyor.errors import InvocationTimeout
    from conveyor.serialization import is_plain_json
    from conveyor.task import Invocation, result_of

    positional = [
        _parse_json(text, f"argument {n}") for n, text in enumerate(args.args, 1)
    ]
    kwargs = _parse_json(args.kwargs, "--kwargs") if args.kwargs else {}
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs must be a JSON object, like '{\"top\": 3}'")
    client = _client(args)

    if args.background:
        record = client.invoke(args.name, positional, kwargs)
        if out.as_json:
            out.json({"id": record["id"], "status": record["status"]})
        else:
            out.line(record["id"])
        return 0

    started = time.monotonic()
    record = client.invoke(args.name, positional, kwargs, wait_s=args.timeout or 50.0)
    if record["status"] not in ("succeeded", "failed", "timed_out", "cancelled"):
        left = None
        if args.timeout is not None:
            left = max(0.0, args.timeout - (time.monotonic() - started))
        try:
            record = Invocation(record["id"], client).wait(left)
        except InvocationTimeout:
            raise InvocationTimeout(
                f"invocation {record['id']} did not finish within "
                f"{args.timeout:g} s; it goes on: see 'conveyor status "
                f"{record['id']}'",
                record["id"],
            ) from None
    result = result_of(record)
    # One line, so that scripts can read it and people can see it whole.
    out.line(json.dumps(result if is_plain_json(result) else repr(result)))
    return 0


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"{what} is not JSON ({exc}): {text!r}; quote strings as '\"text\"'"
        ) from None


def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    functions = _client(args).functions()
    if out.as_json:
        out.json(functions)
        return 0
    out.table(
        ("name", "version", "versions", "kind", "timeout", "memory", "created"),
        [
            (
                f["name"],
                f["version"],
                f.get("versions", ""),
                f.get("kind", "source"),
                f"{f['timeout_s']:g} s",
                f"{f['memory_mb']} MB",
                f["created_at"],
            )
            for f in functions
        ],
    )
    return 0


def cmd_rm(args: argparse.Namespace, out: Output) -> int:
    _client(args).delete_function(args.name)
    if out.as_json:
        out.json({"removed": args.name})
    else:
        out.line(f"Removed {args.name}")
    return 0


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    record = _client(args).invocation(args.id)
    if out.as_json:
        out.json(record)
        return 0
    fields = (
        "id",
        "function",
        "version",
        "status",
        "attempts",
        "created_at",
        "started_at",
        "finished_at",
        "duration_ms",
    )
    width = max(len(name) for name in fields)
    for name in fields:
        value = record.get(name)
        shown = out.status(str(value)) if name == "status" else value
        if name == "duration_ms" and isinstance(value, (int, float)):
            shown = f"{value:.1f}"
        out.line(f"{name.ljust(width)}  {'-' if value is None else shown}")
    if record.get("status") == "succeeded":
        out.line(f"{'result'.ljust(width)}  {json.dumps(record.get('result'))}")
    error = record.get("error")
    if error:
        out.line(f"{'error'.ljust(width)}  {error.get('type')}: {error.get('message')}")
        if error.get("traceback"):
            out.line(error["traceback"].rstrip())
    return 0


def cmd_logs(args: argparse.Namespace, out: Output) -> int:
    from conveyor.task import Invocation

    client = _client(args)
    if args.follow:
        Invocation(args.id, client).wait()
    answer = client.logs(args.id)
    if out.as_json:
        out.json(answer)
        return 0
    out.stream.write(answer["logs"])
    if answer["logs"] and not answer["logs"].endswith("\n"):
        out.line()
    if answer.get("truncated"):
        print("(the output was truncated)", file=sys.stderr)
    return 0


def cmd_invocations(args: argparse.Namespace, out: Output) -> int:
    page = _client(args).invocations(args.function, args.status, args.limit)
    rows = page["invocations"]
    if out.as_json:
        out.json(page)
        return 0
    out.table(
        ("id", "function", "version", "status", "attempts", "created", "duration"),
        [
            (
                r["id"],
                r["function"],
                r["version"],
                r["status"],
                r["attempts"],
                r["created_at"],
                "-" if r.get("duration_ms") is None else f"{r['duration_ms']:.1f} ms",
            )
            for r in rows
        ],
    )
    return 0


def cmd_keys(args: argparse.Namespace, out: Output) -> int:
    client = _client(args)
    if args.key_command == "create":
        scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
        answer = client.create_key(args.tenant, scopes)
        if out.as_json:
            out.json(answer)
        else:
            out.line(f"Key {answer['id']} for tenant {args.tenant}:")
            out.line(answer["key"])
            print("(shown once: keep it now)", file=sys.stderr)
        return 0
    if args.key_command == "ls":
        keys = client.keys()
        if out.as_json:
            out.json(keys)
        else:
            out.table(
                ("id", "tenant", "scopes", "created", "revoked"),
                [
                    (
                        k["id"],
                        k["tenant"],
                        ",".join(k["scopes"]),
                        k["created_at"],
                        "yes" if k["revoked"] else "no",
                    )
                    for k in keys
                ],
            )
        return 0
    client.revoke_key(args.id)
    if out.as_json:
        out.json({"revoked": args.id})
    else:
        out.line(f"Revoked {args.id}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Output], int]] = {
    "login": cmd_login,
    "deploy": cmd_deploy,
    "invoke": cmd_invoke,
    "ls": cmd_ls,
    "rm": cmd_rm,
    "status": cmd_status,
    "logs": cmd_logs,
    "invocations": cmd_invocations,
    "keys": cmd_keys,
}


if __name__ == "__main__":
    sys.exit(main())
