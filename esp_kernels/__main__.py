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
    parser.add_argument("--instances", type=int, default=4, help="virtual instances (default 4)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="local checkpoint dir (config.json + safetensors); default: random")
    parser.add_argument("--requests", type=int, default=None, help="number of requests")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeline", default="esp_timeline.png", help="PNG path ('' for none)")
    parser.add_argument("--no-verify", action="store_true", help="skip the transformers check")
    parser.add_argument("--quiet", action="store_true",
                        help="print decode-only iterations only in the summary")


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(device=args.device, instances=args.instances, model_dir=args.model,
                    requests=args.requests, rate=args.rate, seed=args.seed,
                    verify_outputs=not args.no_verify, timeline_path=args.timeline or None,
                    quiet=args.quiet)


def _simulate_arguments(parser):
    from .sim.cli import add_arguments

    add_arguments(parser)


def _simulate(args) -> int:
    from .sim.cli import run_cli

    return run_cli(args)


COMMANDS = [
    Command("show-config", "version, build, devices", _show_config),
    Command("demo", "serve a model over elastic virtual instances of this device, verified "
            "against transformers", _demo,
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
