#!/usr/bin/env python
"""CPU latency of a physically compressed MiniLM-L6 QA model vs the dense one, and their MACs.

Half of the attention heads and half of the MLP channels of every layer (the lowest-norm units)
are zeroed and removed with `geta_hf.compress_model`; both models then run inference side by side
in one run (interleaved repetitions, median) on batch 8 x seq 256 with 2 threads.
Target (issue #4): measured speedup >= 0.8 x the MAC ratio.

    python scripts/bench_compress.py [--batch 8] [--seq 256] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _bench_common import load_minilm, make_batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of units removed per family")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import geta_hf
    from geta_hf.utils import tune_cpu_allocator

    tune_cpu_allocator()
    dense = load_minilm().eval()
    batch = make_batch(args.batch, args.seq, dense.config.vocab_size, labels=False)

    small = copy.deepcopy(dense)
    example = {k: v[:2, :64] for k, v in batch.items()}
    qadg = geta_hf.build_qadg(small, example)
    norms = qadg.unit_norms(small)
    drop = []
    for f in qadg.families:
        k = int(f.num_units * args.fraction)
        order = torch.argsort(norms[f.offset:f.offset + f.num_units], stable=True)
        drop += (order[:k] + f.offset).tolist()
    qadg.zero_units(small, drop)
    geta_hf.compress_model(small, qadg, example_inputs=example)

    stats = geta_hf.model_stats(small, batch, reference=dense)
    mac_ratio = stats["reference"]["macs"] / stats["macs"]

    models = {"dense": dense, "compressed": small}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(**batch)
        for _ in range(args.reps):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(**batch)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = med["dense"] / med["compressed"]
    print(f"MiniLM-L6 QA inference, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"median of {args.reps}; {args.fraction:.0%} of heads and MLP channels removed")
    print(f"{'model':<11} {'seconds':>8} {'params':>10} {'MACs':>14}")
    print(f"{'dense':<11} {med['dense']:8.3f} {stats['reference']['params']:>10} "
          f"{stats['reference']['macs']:>14}")
    print(f"{'compressed':<11} {med['compressed']:8.3f} {stats['params']:>10} {stats['macs']:>14}")
    print(f"MAC ratio {mac_ratio:.2f}x, measured speedup {speedup:.2f}x = "
          f"{speedup / mac_ratio:.2f} of the MAC ratio (target >= 0.80)")
    return {"speedup": speedup, "mac_ratio": mac_ratio, "efficiency": speedup / mac_ratio}


if __name__ == "__main__":
    main()
