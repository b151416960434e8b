"""Command line: `python -m esp_kernels COMMAND [options]`; with no command it prints the help.

Each command is one line of COMMANDS: its name, its help, the function that runs it (importing
what it needs only then) and, optionally, the function that adds its options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def _show_config(args) -> int:
    from .config import show_config

    show_config()
    return 0


def _demo_arguments(parser):
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, quick=args.quick)


def _simulate_arguments(parser):
    from .sim.cli import add_arguments

    add_arguments(parser)


def _simulate(args) -> int:
    from .sim.cli import run_cli

    return run_cli(args)


COMMANDS = [
    Command("show-config", "version, build, devices", _show_config),
    Command("demo", "the ESP lifecycle on virtual instances of this device", _demo,
            _demo_arguments),
    Command("simulate", "discrete-event serving simulator: ESP vs static SP / chunked prefill / "
            "disaggregation", _simulate, _simulate_arguments),
]


def build_parser(commands=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m esp_kernels",
                                     description="esp_kernels: elastic sequence parallelism")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    for cmd in commands if commands is not None else COMMANDS:
        sub_parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sub_parser)
        sub_parser.set_defaults(run=cmd.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # no command: the help, not an error
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
