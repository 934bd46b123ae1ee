#!/usr/bin/env python
"""Forward+backward time of the prepared (fake-quantized) vs the float MiniLM-L6 QA model.

Both models are measured side by side in one run (interleaved repetitions, median of each), on
batch 8 x seq 256 with 2 threads, weight-only and weight+activation quantization.
Targets (issue #2): <= 1.10x weight-only, <= 1.25x weight+activation.

    python scripts/bench_quant.py [--batch 8] [--seq 256] [--reps 7] [--threads 2]
                                  [--allocator tuned|default]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _bench_common import load_minilm, make_batch


def fwd_bwd(model, batch) -> float:
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                    help="'tuned' applies geta_hf.utils.tune_cpu_allocator() (both models run "
                         "under it); 'default' keeps glibc's defaults")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import geta_hf
    from geta_hf import GETAConfig
    from geta_hf.utils import tune_cpu_allocator

    if args.allocator == "tuned":
        tune_cpu_allocator()

    base = load_minilm().train()
    batch = make_batch(args.batch, args.seq, base.config.vocab_size)
    models = {"float": base}
    models["weight-only"] = geta_hf.prepare_model(copy.deepcopy(base), GETAConfig(weight_bits=(4, 8)))
    cfg_act = GETAConfig(weight_bits=(4, 8), activation_bits=(8, 8))
    calib = [make_batch(2, args.seq, base.config.vocab_size, seed=s) for s in (1, 2)]
    models["weight+act"] = geta_hf.prepare_model(copy.deepcopy(base), cfg_act, calib)
    for m in models.values():  # training mode: dropout and all, as in fine-tuning
        m.train()
    for m in models.values():  # warm-up
        fwd_bwd(m, batch)
    times = {k: [] for k in models}
    for _ in range(args.reps):
        for k, m in models.items():
            times[k].append(fwd_bwd(m, batch))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MiniLM-L6 QA forward+backward, batch {args.batch} x seq {args.seq}, "
          f"{args.threads} threads, median of {args.reps}, {args.allocator} allocator")
    print(f"{'model':<12} {'seconds':>8} {'ratio':>6} {'target':>7}")
    targets = {"float": "", "weight-only": "<=1.10", "weight+act": "<=1.25"}
    result = {}
    for k, v in med.items():
        ratio = v / med["float"]
        result[k] = ratio
        print(f"{k:<12} {v:8.3f} {ratio:6.3f} {targets[k]:>7}")
    return result


if __name__ == "__main__":
    main()
