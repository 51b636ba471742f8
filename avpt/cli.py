"""The ``avpt`` command line.

``avpt demo``: the main job. Until the trainer lands it is the op-level comparison: every
available backend of every op against the fp64 reference, in a small table.
"""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from avpt_kernels import compare

    return compare.main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="avpt", description="Anatomy-guided Visual Prompt Tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job (currently: op-level backend comparison)")
    demo.add_argument("rest", nargs=argparse.REMAINDER, help="options for avpt_kernels.compare")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
