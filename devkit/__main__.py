"""`python -m devkit`: the demo and the benchmark, run from the root of a clone."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devkit", description="Development rig of k3s-deploy-action (not in the image)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="deploy the example platform to a simulated AWS and K3s master")
    bench = commands.add_parser(
        "bench", help="measure the action on a simulated AWS account (docs/PERFORMANCE.md)"
    )
    bench.add_argument("--quick", action="store_true", help="tiny sizes, for CI: checks the bench runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    # Imported on demand: both need moto (the `sim` extra), the help text does not.
    if args.command == "bench":
        from devkit.bench import run_bench

        return run_bench(quick=args.quick)
    from devkit.demo import run_demo

    return run_demo()


if __name__ == "__main__":
    raise SystemExit(main())
