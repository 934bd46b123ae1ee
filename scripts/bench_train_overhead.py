#!/usr/bin/env python
"""Time per optimizer step of `GETATrainer` vs plain `transformers.Trainer` (MiniLM-L6 QA).

All three runs (plain Trainer, GETATrainer weight-only, GETATrainer weight+activation) use the
same data (batch 8 x seq 256), the same model and 2 threads, in one process. Each run trains
``--steps`` optimizer steps; the GETA schedule is spread over them so every stage is timed, and
the median step time (after ``--skip`` warm-up steps) is compared.
Targets (issue #6): <= 1.15x weight-only, <= 1.30x with activations.

    python scripts/bench_train_overhead.py [--steps 24] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from _bench_common import load_minilm


class _StepTimer:
    def __init__(self):
        import transformers

        class CB(transformers.TrainerCallback):
            def __init__(self, outer):
                self.outer = outer

            def on_step_begin(self, args, state, control, **kw):
                self.outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.outer.times.append(time.perf_counter() - self.outer.t0)

        self.times = []
        self.t0 = 0.0
        self.callback = CB(self)


def _rows(n, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (seq,), generator=g)
        s = int(torch.randint(1, seq - 2, (), generator=g))
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long),
                     "start_positions": torch.tensor(s), "end_positions": torch.tensor(s + 1)})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    import geta_hf
    from geta_hf.utils import tune_cpu_allocator

    tune_cpu_allocator()  # for all three runs alike
    base = load_minilm()
    rows = _rows(args.batch * args.steps, args.seq, base.config.vocab_size)
    common = dict(per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=3e-5,
                  report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                  disable_tqdm=True, seed=0, dataloader_num_workers=0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            ("Trainer", None),
            ("GETA weight-only", dict(geta_weight_bits=[4, 16], geta_activation_bits=None)),
            ("GETA weight+act", dict(geta_weight_bits=[4, 16], geta_activation_bits=[8, 16])),
        ]
        for name, geta in runs:
            timer = _StepTimer()
            model = copy.deepcopy(base)
            if geta is None:
                targs = transformers.TrainingArguments(output_dir=tmp, **common)
                trainer = transformers.Trainer(model=model, args=targs, train_dataset=rows,
                                               callbacks=[timer.callback])
            else:
                targs = geta_hf.GETATrainingArguments(
                    output_dir=tmp, geta_target_group_sparsity=0.5, geta_warmup=0.1,
                    geta_projection=0.3, geta_joint=0.4, geta_projection_periods=3,
                    geta_pruning_periods=2, geta_bit_reduction=4, **geta, **common)
                trainer = geta_hf.GETATrainer(model=model, args=targs, train_dataset=rows,
                                              callbacks=[timer.callback])
            trainer.train()
            results[name] = statistics.median(timer.times[args.skip:])
            del trainer, model
    ref = results["Trainer"]
    print(f"MiniLM-L6 QA training, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"{args.steps} optimizer steps per run (median after {args.skip})")
    targets = {"Trainer": "", "GETA weight-only": "<=1.15", "GETA weight+act": "<=1.30"}
    print(f"{'run':<18} {'s/step':>7} {'ratio':>6} {'target':>7}")
    for name, t in results.items():
        print(f"{name:<18} {t:7.3f} {t / ref:6.3f} {targets[name]:>7}")
    return {k: v / ref for k, v in results.items()}


if __name__ == "__main__":
    main()
