"""Command line: `python -m esp_kernels show-config | demo [options]`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esp_kernels",
                                     description="esp_kernels: elastic sequence parallelism")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show-config", help="version, build, devices")
    demo = sub.add_parser("demo", help="serve a model over elastic virtual instances of this "
                          "device, verified against transformers")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    demo.add_argument("--instances", type=int, default=4, help="virtual instances (default 4)")
    demo.add_argument("--model", default=None, metavar="DIR",
                      help="local checkpoint dir (config.json + safetensors); default: random")
    demo.add_argument("--requests", type=int, default=None, help="number of requests")
    demo.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--timeline", default="esp_timeline.png", help="PNG path ('' for none)")
    demo.add_argument("--no-verify", action="store_true", help="skip the transformers check")
    demo.add_argument("--quiet", action="store_true", help="print decode-only iterations "
                      "only in the summary")
    args = parser.parse_args(argv)
    if args.cmd == "show-config":
        from .config import show_config

        show_config()
        return 0
    from .demo import run_demo

    return run_demo(device=args.device, instances=args.instances, model_dir=args.model,
                    requests=args.requests, rate=args.rate, seed=args.seed,
                    verify_outputs=not args.no_verify, timeline_path=args.timeline or None,
                    quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
