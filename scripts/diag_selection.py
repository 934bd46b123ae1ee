#!/usr/bin/env python
"""Which units should be pruned? Unit-selection criteria compared on the study's dense model.

Takes the ``study_qa.py`` dense run's model after ``N/2`` steps (``dense-half.safetensors`` of the
same hyper-parameters, so run the study's ``dense`` method first), scores every unit with each
criterion, and reports (1) the per-family counts and the F1 right after zeroing the chosen
``floor(sparsity x units)`` units (no recovery); (2) with ``--recover CRITERION``, the study's
sequential + KD arm (250 fine-tuning steps with distillation from the final dense model) with
that criterion in place of the RMS magnitude. Criteria: ``rms`` (the sequential baseline's RMS
weight magnitude), ``geta`` (GETA's five criteria at 0.2 each), ``taylor1`` (``|<x, g>|``); the
gradient is the loss gradient summed over ``--grad-batches`` training batches.

    python scripts/diag_selection.py --split dev                    # immediate damage
    python scripts/diag_selection.py --split dev --recover geta     # + 250 KD steps
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _study_common as sc  # noqa: E402
import study_qa as sq  # noqa: E402

_LABELS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")


def unit_stats(model, qadg, task, batches: int):
    """Per-unit ``||x||^2``, ``||g||^2``, ``<x, g>`` with ``g`` the loss gradient over
    ``batches`` training batches of 16 (from row 1000 on)."""
    from geta_hf.optim.importance import UnitStats
    from geta_hf.optim.pruning import resolve_members, unit_sums

    members = resolve_members(model, qadg, dict(model.named_parameters()), [])
    cols = [c for c in task.train_dataset.column_names if c in _LABELS]
    data = task.train_dataset.with_format("torch", columns=cols)
    model.train()
    model.zero_grad()
    for i in range(batches):
        batch = dict(data[1000 + 16 * i:1016 + 16 * i].items())
        (model(**batch).loss / batches).backward()
    sq_x, sq_g, dot = unit_sums(members, qadg, lambda m: m.param.detach(), lambda m: m.param.grad)
    model.zero_grad()
    fams = qadg.families
    counts = torch.tensor([f.num_units for f in fams])
    numel = torch.repeat_interleave(torch.tensor([float(f.group_params_per_unit) for f in fams]),
                                    counts)
    return UnitStats(sq_x=sq_x, sq_g=sq_g, dot=dot, numel=numel)


def selections(model, qadg, task, sparsity: float, batches: int) -> Dict[str, List[int]]:
    """The units each criterion removes (QASSO's selection rule, one unit kept per family)."""
    from geta_hf.config import IMPORTANCE_CRITERIA
    from geta_hf.optim.importance import importance_scores, kept_floor, select_units
    from geta_hf.optim.schedule import target_units

    st = unit_stats(model, qadg, task, batches)
    fams = qadg.families
    n = [f.num_units for f in fams]
    fou = torch.repeat_interleave(torch.arange(len(fams)), torch.tensor(n))
    floors = [kept_floor(f.num_units, f.min_units, 1) for f in fams]
    k = target_units(sparsity, qadg.num_units)
    scores = {"rms": st.sq_x.sqrt() / st.numel.sqrt(),
              "geta": importance_scores(st, {c: 0.2 for c in IMPORTANCE_CRITERIA}),
              "taylor1": importance_scores(st, {"taylor_first_order": 1.0})}
    return {name: select_units(s, torch.ones(qadg.num_units, dtype=torch.bool), fou, n, n,
                               floors, 1, k) for name, s in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="dev", choices=["dev", "eval"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--grad-batches", type=int, default=8)
    ap.add_argument("--recover", choices=["rms", "geta", "taylor1"])
    ap.add_argument("--work-dir", default=os.path.join(sc.REPO, "runs", "study"),
                    help="the study's --work-dir (its dense snapshots are read, never written)")
    ap.add_argument("--out", default=os.path.join(sc.REPO, "runs", "diag-selection"),
                    help="where the recovery run's record goes (not the study's pages)")
    args = ap.parse_args()
    sc.setup_process(2)
    qa = sq.parse_args(["--datasets", "squad11", "--split", args.split, "--steps", "500",
                        "--max-length", "256", "--doc-stride", "64"])
    task = sq.QATask("squad11", *sq.load_examples("squad11", qa), 256, 64, 16,
                     qa.calibration_batches, qa.stats_rows)
    hp = sq.hyper(qa)
    study = sc.Runner(task, hp, 0, sc.RunStore(args.out, hp, "diag"), args.work_dir)
    # a separate work folder: the recovery run must not replace the study's snapshots
    runner = sc.Runner(task, hp, 0, sc.RunStore(args.out, hp, "diag"), args.work_dir + "-diag")
    for src, dst in ((study.half_path, runner.half_path), (study.final_path, runner.final_path)):
        if not os.path.exists(src):
            raise SystemExit(f"{src} is missing: run study_qa.py --methods dense first")
        if not os.path.exists(dst):
            os.symlink(src, dst)
    import geta_hf

    model = task.fresh_model(0)
    sc.load_snapshot(model, study.half_path)
    qadg = geta_hf.build_qadg(model, task.example_inputs())
    chosen = selections(model, qadg, task, args.sparsity, args.grad_batches)
    for name, units in chosen.items():
        pruned = copy.deepcopy(model)
        qadg.zero_units(pruned, units)
        per = [sum(f.offset <= u < f.offset + f.num_units for u in units) for f in qadg.families]
        f1 = task.score(pruned)["f1"]
        sc.log(f"{name}: overlap with rms {len(set(units) & set(chosen['rms'])) / len(units):.3f}, "
               f"F1 right after pruning {f1:.2f}; units per family {per}")
    if args.recover:
        sc.magnitude_units = lambda m, q, k: selections(m, q, task, args.sparsity,
                                                        args.grad_batches)[args.recover]
        rec = runner.run(sc.Run("sequential_kd", sc.Setting(args.sparsity, (4, 8))), rerun=True)
        for r in rec["rows"]:
            sc.log(f"recovered ({args.recover}): {r['label']}: F1 {r['metrics']['f1']:.2f}")


if __name__ == "__main__":
    main()
