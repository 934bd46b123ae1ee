"""The joint-vs-sequential studies (issue #9) run end to end in their ``--smoke`` configuration.

Each test runs a script in a subprocess, exactly as a user would, into a temporary folder, then
checks the per-run JSON records (every expected row, finite numbers, the sequential baseline
quantized to GETA's learned bits) and the rendered markdown and plot.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "..", "shared", "data", "squad-v2-dev-slice.json")
if not os.path.exists(SLICE):
    SLICE = "/work/shared/data/squad-v2-dev-slice.json"

QA_KEYS = {
    "dense", "geta-s0.3-w4-8", "geta-s0.5-w4-8", "geta-s0.5-w4-8-a8-16", "qat-w4-8",
    "qat-w4-8-a8-16", "prune-s0.3", "prune-s0.5", "magprune-s0.3", "magprune-s0.5",
    "seq-s0.3-w4-8-max", "seq-s0.3-w4-8-mse", "seq-s0.5-w4-8-max", "seq-s0.5-w4-8-mse",
    "seq-s0.5-w4-8-a8-16-max", "seq-s0.5-w4-8-a8-16-mse",
    "geta-kd-s0.3-w4-8", "geta-kd-s0.5-w4-8", "geta-kd-s0.5-w4-8-a8-16", "magprune-kd-s0.3",
    "magprune-kd-s0.5", "seq-kd-s0.3-w4-8-max", "seq-kd-s0.3-w4-8-mse", "seq-kd-s0.5-w4-8-max",
    "seq-kd-s0.5-w4-8-mse", "seq-kd-s0.5-w4-8-a8-16-max", "seq-kd-s0.5-w4-8-a8-16-mse",
}
LM_KEYS = {"dense", "geta-s0.2-w4-8", "qat-w4-8", "prune-s0.2", "magprune-s0.2",
           "seq-s0.2-w4-8-max", "seq-s0.2-w4-8-mse"}


def _run(script, out, *extra):
    # one thread: immune to the OpenMP slow-down when another job shares the two cores
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script), "--smoke", "--threads", "1",
           "--out", str(out), "--work-dir", str(out / "work"), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _records(out, study):
    base = out / "study-runs" / study
    return [json.loads(p.read_text()) for p in sorted(base.rglob("*.json"))]


def _rows(records):
    return {row["key"]: row for rec in records for row in rec["rows"]}


def _check_rows(rows, metric_ok):
    for key, row in rows.items():
        nums = [row["relative_bops"], row["relative_params"], row["size_bytes"], row["latency_ms"],
                row["params"], *row["metrics"].values()]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in nums), (key, row)
        assert all(metric_ok(v) for v in row["metrics"].values()), (key, row["metrics"])
        assert row["size_bytes"] > 0 and row["latency_ms"] > 0
    assert rows["dense"]["relative_bops"] == 1.0
    for key, row in rows.items():
        if key != "dense":  # every other model is pruned and/or quantized
            assert row["relative_bops"] < 1.0, key
        if key.startswith(("prune-", "magprune-", "geta-", "seq-")):
            assert row["removed_units"] > 0 and row["relative_params"] < 1.0, key


def _check_sequential_used_geta_bits(records):
    for rec in records:
        if rec["method"] in ("sequential", "sequential_kd"):
            for row in rec["rows"]:
                if row["key"].startswith("seq-"):
                    assert "GETA's per-layer bits" in row["note"], row
            geta = {r["run"]: r for r in records if r["method"] in ("geta", "geta_kd")}
            for key, used in rec["ptq_bits"].items():
                source = geta["geta-" + key[len("seq-"):].rsplit("-", 1)[0]]["layer_bits"]
                assert {n: b["weight"] for n, b in used.items()} == \
                    {n: b["weight"] for n, b in source.items()}


def test_study_qa_smoke(tmp_path):
    stdout = _run("study_qa.py", tmp_path)
    assert "study_qa finished" in stdout
    records = _records(tmp_path, "qa")
    assert {r["dataset"] for r in records} == {"generated"}
    rows = _rows(records)
    assert set(rows) == QA_KEYS
    _check_rows(rows, lambda v: 0.0 <= v <= 100.0)
    _check_sequential_used_geta_bits(records)
    # same step budget: every training method ran the configured number of steps
    assert {r["hyper"]["steps"] for r in records} == {6}
    page = (tmp_path / "results.md").read_text()
    section = (tmp_path / "results_qa.md").read_text()
    assert section.strip() in page and "### generated" in section
    for label in ("dense fine-tuning (fp32)", "GETA joint", "QAT only", "pruning only",
                  "magnitude pruning + fine-tuning", "sequential, PTQ mse clip",
                  "GETA joint + KD", "sequential + KD, PTQ mse clip"):
        assert label in section
    assert "python scripts/study_qa.py" in section and "Joint vs. sequential" in section
    assert (tmp_path / "study_qa.png").stat().st_size > 10_000


def test_study_qa_smoke_on_real_squad_resumes(tmp_path):
    assert os.path.exists(SLICE), f"the shared SQuAD slice is missing: {SLICE}"
    args = ("--datasets", "squad", "--methods", "dense,prune", "--squad-file", SLICE)
    _run("study_qa.py", tmp_path, *args)
    records = _records(tmp_path, "qa")
    assert {r["dataset"] for r in records} == {"squad"}
    assert set(_rows(records)) == {"dense", "prune-s0.3", "prune-s0.5"}
    _check_rows(_rows(records), lambda v: 0.0 <= v <= 100.0)
    assert records[0]["data"]["eval_articles"]  # split by article
    stdout = _run("study_qa.py", tmp_path, *args)  # a rerun reuses the finished runs
    assert stdout.count("stored result reused") == 3
    assert "### squad" in (tmp_path / "results.md").read_text()


def test_study_lm_smoke(tmp_path):
    stdout = _run("study_lm.py", tmp_path, "--squad-file", SLICE)
    assert "study_lm finished" in stdout
    records = _records(tmp_path, "lm")
    rows = _rows(records)
    assert set(rows) == LM_KEYS
    _check_rows(rows, lambda v: v > 1.0)
    _check_sequential_used_geta_bits(records)
    section = (tmp_path / "results_lm.md").read_text()
    assert "perplexity" in section and "python scripts/study_lm.py" in section
    assert section.strip() in (tmp_path / "results.md").read_text()
    assert (tmp_path / "study_lm.png").stat().st_size > 10_000


def test_study_qa_budget_setting_tops_up_the_sequential_run(tmp_path):
    """A BOPs-budget setting added later: GETA runs with target_relative_bops, and the stored
    sequential run gets the matching PTQ rows from its saved fine-tuned model (no retraining)."""
    base = ("--methods", "dense,geta,sequential")
    _run("study_qa.py", tmp_path, *base, "--settings", "s0.5-w4-8")
    stdout = _run("study_qa.py", tmp_path, *base, "--settings", "s0.5-w4-8,s0.5-w4-8-B0.2")
    assert "adding PTQ rows for ['s0.5-w4-8-B0.2']" in stdout
    records = _records(tmp_path, "qa")
    rows = _rows(records)
    assert {"geta-s0.5-w4-8-B0.2", "seq-s0.5-w4-8-B0.2-mse", "seq-s0.5-w4-8-B0.2-max"} <= set(rows)
    geta = next(r for r in records if r["run"] == "geta-s0.5-w4-8-B0.2")
    assert geta["geta_config"]["target_relative_bops"] == 0.2
    _check_sequential_used_geta_bits(records)
    assert stdout.count("stored result reused") == 3  # dense, geta s0.5-w4-8, sequential


def test_study_qa_variant_shares_the_default_runs(tmp_path):
    """A stage variant (for choosing stages on --split dev) reuses the dense and sequential runs
    (it does not change them), runs GETA under its own name with its stages, and the sequential
    run gets PTQ rows at the variant's learned bits."""
    base = ("--methods", "dense,geta_kd,sequential_kd", "--settings", "s0.5-w4-8-B0.2")
    _run("study_qa.py", tmp_path, *base)
    stdout = _run("study_qa.py", tmp_path, *base, "--variant", "late")
    assert stdout.count("stored result reused") == 2  # dense, sequential_kd
    assert "adding PTQ rows for ['s0.5-w4-8-B0.2-vlate']" in stdout
    records = _records(tmp_path, "qa")
    geta = next(r for r in records if r["run"] == "geta-kd-s0.5-w4-8-B0.2-vlate")
    assert geta["variant"] == {"name": "late", "warmup": 0.2, "projection": 0.2, "joint": 0.2}
    assert (geta["geta_config"]["warmup"], geta["geta_config"]["joint"]) == (0.2, 0.2)
    default = next(r for r in records if r["run"] == "geta-kd-s0.5-w4-8-B0.2")
    assert (default["geta_config"]["warmup"], default["geta_config"]["joint"]) == (0.1, 0.3)
    assert {"seq-kd-s0.5-w4-8-B0.2-vlate-mse", "seq-kd-s0.5-w4-8-B0.2-mse"} <= set(_rows(records))
    _check_sequential_used_geta_bits(records)
    page = (tmp_path / "results_qa.md").read_text()
    assert "[variant late]" in page
    assert "- `late`: warm-up 0.2, projection 0.2, joint 0.2" in page  # what the variant changes


def test_study_variant_with_a_distillation_weight_names_its_sequential_run():
    sc = _import_scripts("_study_common")
    settings = [sc.Setting(0.5, (4, 8), bops=0.2, variant="kd0.8")]
    methods = ["dense", "geta", "geta_kd", "qat", "prune", "sequential", "sequential_kd"]
    names = [r.name for r in sc.plan_runs(methods, settings)]
    # the weight changes the KD arms only: the other arms are shared with the default
    assert names == ["dense", "geta-s0.5-w4-8-B0.2-vkd0.8", "geta-kd-s0.5-w4-8-B0.2-vkd0.8",
                     "qat-w4-8", "prune-s0.5", "sequential-s0.5", "sequential-kd-s0.5-vkd0.8"]
    # a stage / saliency variant changes GETA's ablations (QAT only, pruning only) too
    grad_1p = [sc.Setting(0.5, (4, 8), variant="sal-grad-1p")]
    names = [r.name for r in sc.plan_runs(methods, grad_1p)]
    assert names == ["dense", "geta-s0.5-w4-8-vsal-grad-1p", "geta-kd-s0.5-w4-8-vsal-grad-1p",
                     "qat-w4-8-vsal-grad-1p", "prune-s0.5-vsal-grad-1p", "sequential-s0.5",
                     "sequential-kd-s0.5"]
    assert settings[0].geta_config().warmup == sc.STAGES["warmup"]
    with __import__("pytest").raises(SystemExit, match="unknown variant"):
        sc.Setting(0.5, variant="nope")


def _import_scripts(name):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_study_report_pairs_seeds_and_names_variants():
    """The per-seed table compares GETA with its best sequential arm and dense seed by seed
    (paired differences), and the page says what a variant changes."""
    report = _import_scripts("_study_report")

    def row(key, method, f1, sparsity=0.5, bits=(4, 8)):
        return {"key": key, "method": method, "label": key, "sparsity": sparsity,
                "weight_bits": list(bits) if bits else None, "act_bits": None, "note": "",
                "bops_target": None, "variant": "late" if method != "dense" else "",
                "metrics": {"f1": f1}, "relative_bops": 0.25, "relative_params": 0.8,
                "params": 1e6, "size_bytes": 1e6, "latency_ms": 1.0,
                "avg_linear_weight_bits": 8.0, "avg_act_bits": 0.0, "removed_units": 0.5}

    f1 = {0: (60.0, 59.0, 58.0, 64.0), 1: (61.0, 57.0, 59.0, 63.0)}  # geta, seq mse, seq max, dense
    records = [{"dataset": "d", "seed": s, "method": m, "rows": [r],
                "variant": {"name": "late", "joint": 0.2} if m == "geta_kd" else {}}
               for s, (g, mse, mx, d) in f1.items()
               for m, r in (("geta_kd", row("geta-kd-s0.5-w4-8-vlate", "geta_kd", g)),
                            ("sequential_kd", row("seq-kd-s0.5-w4-8-vlate-mse", "sequential_kd", mse)),
                            ("sequential_kd", row("seq-kd-s0.5-w4-8-vlate-max", "sequential_kd", mx)),
                            ("dense", row("dense", "dense", d, 0.0, None)))]
    rows = report.aggregate(records, ["f1"])["d"]
    text = "\n".join(report.seed_tables(records, "d", rows, "f1", "F1", True))
    # best sequential arm on the mean: max clip (58.5) over mse (58.0)
    assert "| seq-kd-s0.5-w4-8-vlate-max | 58.00 | 59.00 | 58.50 ± 0.71 |" in text
    assert "| GETA - sequential | +2.00 | +2.00 | +2.00 ± 0.00 |" in text
    assert "| GETA - dense | -4.00 | -2.00 | -3.00 ± 1.41 |" in text
    assert report.variants_text(records).endswith("- `late`: joint 0.2\n")


def test_study_verdict_compares_a_one_seed_arm_on_its_own_seed():
    """A GETA arm run on seed 0 only is compared with the baselines' seed 0, not with their mean
    over more seeds, and the verdict says so."""
    report = _import_scripts("_study_report")

    def row(key, method, f1, sparsity=0.5, bits=(4, 8)):
        return {"key": key, "method": method, "label": key, "sparsity": sparsity,
                "weight_bits": list(bits) if bits else None, "act_bits": None, "note": "",
                "bops_target": None, "variant": "", "metrics": {"f1": f1},
                "relative_bops": 0.25 if bits else 1.0, "relative_params": 0.8, "params": 1e6,
                "size_bytes": 1e6, "latency_ms": 1.0, "avg_linear_weight_bits": 8.0,
                "avg_act_bits": 0.0, "removed_units": 0.5}

    # seed 0: GETA 60 vs sequential 61 (worse); sequential's mean over seeds 0,1 is 58 (would win)
    f1 = {0: {"geta": 60.0, "seq": 61.0, "dense": 64.0}, 1: {"seq": 55.0, "dense": 62.0}}
    keys = {"geta": ("geta-s0.5-w4-8", "geta"), "seq": ("seq-s0.5-w4-8-mse", "sequential"),
            "dense": ("dense", "dense")}
    records = [{"dataset": "d", "seed": s, "method": keys[m][1], "variant": {},
                "rows": [row(keys[m][0], keys[m][1], v, *((0.0, None) if m == "dense" else ()))]}
               for s, per in f1.items() for m, v in per.items()]
    rows = report.aggregate(records, ["f1"])["d"]
    text = "\n".join(report.verdict(rows, "f1", "F1", True, report.per_seed(records, "d", "f1")))
    assert "best sequential arm (seq-s0.5-w4-8-mse) 61.00 at 0.2500x BOPs (on seed 0" in text
    assert "GETA is **worse**: F1 -1.00" in text and "Dense: 64.00 (F1 -4.00)" in text
    # without per-seed values, the means (the previous behaviour)
    text = "\n".join(report.verdict(rows, "f1", "F1", True))
    assert "best sequential arm (seq-s0.5-w4-8-mse) 58.00" in text and "on seed" not in text
