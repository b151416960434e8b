"""Command line: `python -m esp_kernels show-config | demo | simulate [options]`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esp_kernels",
                                     description="esp_kernels: elastic sequence parallelism")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show-config", help="version, build, devices")
    demo = sub.add_parser("demo", help="the ESP lifecycle on virtual instances of this device")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    demo.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    from .sim.cli import add_parser as add_simulate_parser

    add_simulate_parser(sub)   # sets args.func
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is not None:
        return args.func(args)
    if args.cmd == "show-config":
        from .config import show_config

        show_config()
        return 0
    from .demo import run_demo

    return run_demo(device=args.device, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
