"""Reporting for the joint-vs-sequential studies: aggregation over seeds, tables, the verdict,
plots and the ``docs/results*.md`` pages, all computed from the stored run records."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from _study_common import BIT_REDUCTION, KD, METHODS, STAGES, Hyper, RunStore, Setting


# ============================================================================ aggregation
def aggregate(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Dict[str, List[dict]]:
    """``{dataset: [row summary, ...]}``: mean and spread over seeds for every row key."""
    groups: Dict[Tuple[str, str], List[Tuple[int, dict, dict]]] = {}
    order: Dict[Tuple[str, str], tuple] = {}
    method_rank = {m: i for i, m in enumerate(METHODS)}
    for rec in records:
        for row in rec["rows"]:
            key = (rec["dataset"], row["key"])
            groups.setdefault(key, []).append((rec["seed"], row, rec))
            # methods in METHODS order; the sequential fp32 rows before its quantized ones
            order.setdefault(key, (method_rank.get(rec["method"], 99),
                                   not row["key"].startswith("magprune"), row["sparsity"],
                                   bool(row["act_bits"])))
    out: Dict[str, List[dict]] = {}
    numeric = ["relative_bops", "relative_params", "params", "size_bytes", "latency_ms",
               "avg_linear_weight_bits", "avg_act_bits", "removed_units"]
    for key in sorted(groups, key=lambda k: (k[0], order[k], k[1])):
        items = groups[key]
        first = items[0][1]
        summary = {k: first[k] for k in ("key", "method", "label", "sparsity", "weight_bits",
                                         "act_bits", "note")}
        summary["bops_target"] = first.get("bops_target")
        summary["variant"] = first.get("variant", "")
        summary["seeds"] = sorted(s for s, _, _ in items)
        summary["train_seconds"] = _mean([r.get("train_seconds", 0.0) for _, _, r in items])
        for name in numeric:
            summary[name] = _stat([row[name] for _, row, _ in items])
        summary["metrics"] = {m: _stat([row["metrics"][m] for _, row, _ in items]) for m in metrics}
        out.setdefault(key[0], []).append(summary)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _stat(xs: Sequence[float]) -> Dict[str, float]:
    xs = [float(x) for x in xs]
    return {"mean": _mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def fmt_stat(s: Mapping[str, float], digits: int = 2) -> str:
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def _bits_cell(row: Mapping[str, Any]) -> str:
    if not row["weight_bits"]:
        return "fp32"
    cell = f"{row['avg_linear_weight_bits']['mean']:.2f}"
    if row["act_bits"]:
        cell += f" / {row['avg_act_bits']['mean']:.1f}"
    return cell


def table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], metric_titles: Mapping[str, str]
          ) -> str:
    """The markdown results table of one dataset."""
    head = (["method", "sparsity (units removed)", "bit target", "avg bits w / a"]
            + [metric_titles.get(m, m) for m in metrics]
            + ["rel. BOPs", "params", "size on disk", "CPU latency", "seeds"])
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        sp = f"{r['sparsity']:g} ({r['removed_units']['mean']:.3f})" if r["sparsity"] else "0"
        target = "fp32"
        if r["weight_bits"]:
            target = "w [{},{}]".format(*r["weight_bits"])
            if r["act_bits"]:
                target += ", a [{},{}]".format(*r["act_bits"])
            if r.get("bops_target") is not None:
                target += f", BOPs <= {r['bops_target']:g}"
        if r.get("variant"):
            target += f" [variant {r['variant']}]"
        cells = [r["label"], sp, target, _bits_cell(r)]
        cells += [fmt_stat(r["metrics"][m]) for m in metrics]
        cells += [fmt_stat(r["relative_bops"], 4), f"{r['params']['mean'] / 1e6:.2f}M",
                  f"{r['size_bytes']['mean'] / 2**20:.1f} MiB",
                  f"{fmt_stat(r['latency_ms'], 0)} ms", ",".join(str(s) for s in r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ============================================================================ the verdict
def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def _setting_of(row: Mapping[str, Any]) -> Setting:
    return Setting(row["sparsity"], tuple(row["weight_bits"]) if row["weight_bits"] else None,
                   tuple(row["act_bits"]) if row["act_bits"] else None, row.get("bops_target"),
                   row.get("variant", ""))


def best_sequential(g: Mapping[str, Any], by_key: Mapping[str, Mapping[str, Any]], metric: str,
                    higher: bool, score: Optional[Callable[[Mapping[str, Any]], float]] = None
                    ) -> Optional[Mapping[str, Any]]:
    """The sequential row (with or without KD, either clip) at GETA row ``g``'s sparsity and bit
    target with the best ``score`` (default: mean ``metric``); None when there is none."""
    tag = _setting_of(g).tag
    seqs = [by_key[k] for k in (f"{pre}-{tag}-{clip}" for pre in ("seq", "seq-kd")
                                for clip in ("max", "mse")) if k in by_key]
    score = score or (lambda r: r["metrics"][metric]["mean"])
    sign = 1 if higher else -1
    return max(seqs, key=lambda r: sign * score(r)) if seqs else None


def _scorer(seeds: Sequence[int], metric: str, vals: Optional[Mapping[str, Mapping[int, float]]]
            ) -> Tuple[Callable[[Mapping[str, Any]], float], Callable[[Mapping[str, Any]], bool]]:
    """``(score, restricted)``: a row's mean ``metric`` over ``seeds`` when its per-seed values
    (``vals``) cover them and it ran on other seeds too (a one-seed GETA arm is then compared
    with the baselines' same seed, not their mean over three), else its mean; ``restricted``
    tells whether that restriction applied."""
    def restricted(r):
        have = (vals or {}).get(r["key"], {})
        return list(r["seeds"]) != list(seeds) and all(s in have for s in seeds)

    def score(r):
        if restricted(r):
            return statistics.fmean(vals[r["key"]][s] for s in seeds)
        return r["metrics"][metric]["mean"]
    return score, restricted


def verdict(rows: Sequence[Mapping[str, Any]], metric: str, title: str, higher: bool,
            vals: Optional[Mapping[str, Mapping[int, float]]] = None) -> List[str]:
    """Plain statements, from the numbers, of how each GETA row fares against the sequential
    baseline at the same sparsity and bit target (the better of its two clip variants), and
    the rows on the metric-vs-BOPs Pareto front. With ``vals`` (:func:`per_seed`), a GETA row
    run on fewer seeds than its baselines is compared on its own seeds (see :func:`_scorer`)."""
    lines = []
    by_key = {r["key"]: r for r in rows}
    wins = losses = 0
    dense = by_key.get("dense")
    for g in (r for r in rows if r["method"] in ("geta", "geta_kd")):
        setting = _setting_of(g)
        score, restricted = _scorer(g["seeds"], metric, vals)
        best = best_sequential(g, by_key, metric, higher, score)
        if best is None:
            continue
        gm, gb = g["metrics"][metric]["mean"], g["relative_bops"]["mean"]
        sm, sb = score(best), best["relative_bops"]["mean"]
        won = not _better(sm, gm, higher)  # at least equal
        wins, losses = wins + won, losses + (not won)
        gap = ""
        if dense is not None:
            dm = score(dense)
            gap = f" Dense: {dm:.2f} ({title} {'-' if gm < dm else '+'}{abs(gm - dm):.2f})."
        on = ""
        if restricted(best) or (dense is not None and restricted(dense)):
            on = f" (on seed{'s' if len(g['seeds']) > 1 else ''} " + ",".join(
                str(s) for s in g["seeds"]) + ", the seeds this GETA row ran)"
        lines.append(
            f"- **sparsity {setting.sparsity:g}, {setting.bits_label}**: {g['label']} {title} "
            f"{gm:.2f} at {gb:.4f}x BOPs; best sequential arm ({best['label']}) {sm:.2f} at "
            f"{sb:.4f}x BOPs{on}. GETA is {'at least equal' if won else '**worse**'}: {title} "
            f"{'+' if gm >= sm else '-'}{abs(gm - sm):.2f}, at {gb / sb:.2f}x the baseline's "
            f"BOPs.{gap}")
    if wins and not losses:
        lines.append(f"- Summary: GETA is at least equal to the best sequential arm in all {wins} "
                     "matched comparison(s) of this table.")
    elif losses and not wins:
        lines.append(f"- Summary: GETA is **worse** than the best sequential arm in all {losses} "
                     "matched comparison(s) of this table.")
    elif wins and losses:
        lines.append(f"- Summary: GETA is at least equal to the best sequential arm in {wins} of "
                     f"{wins + losses} matched comparisons and **worse** in {losses}.")
    front = pareto(rows, metric, higher)
    if front:
        lines.append("- Pareto front (no other row has fewer BOPs and a better "
                     f"{title}): " + "; ".join(
                         f"{r['label']} `{r['key']}` ({r['metrics'][metric]['mean']:.2f} at "
                         f"{r['relative_bops']['mean']:.4f}x)" for r in front) + ".")
    return lines


def per_seed(records: Sequence[Mapping[str, Any]], dataset: str, metric: str
             ) -> Dict[str, Dict[int, float]]:
    """``{row key: {seed: metric}}`` of one dataset."""
    out: Dict[str, Dict[int, float]] = {}
    for rec in records:
        if rec["dataset"] == dataset:
            for row in rec["rows"]:
                out.setdefault(row["key"], {})[rec["seed"]] = float(row["metrics"][metric])
    return out


def seed_tables(records: Sequence[Mapping[str, Any]], dataset: str, rows: Sequence[Mapping[str, Any]],
                metric: str, title: str, higher: bool) -> List[str]:
    """Per-seed (paired) comparisons of every GETA row run on more than one seed with its best
    sequential arm (chosen on the mean, as in the verdict) and dense: the same seed means the
    same initial head, data order and teacher, so the per-seed differences are the fair ones."""
    vals = per_seed(records, dataset, metric)
    by_key = {r["key"]: r for r in rows}
    lines: List[str] = []
    for g in (r for r in rows if r["method"] in ("geta", "geta_kd") and len(r["seeds"]) > 1):
        best = best_sequential(g, by_key, metric, higher)
        if best is None:
            continue
        seeds = sorted(set(vals[g["key"]]) & set(vals[best["key"]]))
        series = [(g["label"], vals[g["key"]]), (best["label"], vals[best["key"]])]
        series.append(("GETA - sequential", {s: vals[g["key"]][s] - vals[best["key"]][s]
                                             for s in seeds}))
        dense = vals.get("dense", {})
        if all(s in dense for s in seeds):
            series += [("dense", dense),
                       ("GETA - dense", {s: vals[g["key"]][s] - dense[s] for s in seeds})]
        lines += [f"**{_setting_of(g).bits_label}, sparsity {g['sparsity']:g}** ({title}):", "",
                  "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
                  "|---|" + "---:|" * (len(seeds) + 1)]
        for name, v in series:
            sign = "+" if name.startswith("GETA -") else ""
            st = _stat([v[s] for s in seeds])
            cells = [f"{v[s]:{sign}.2f}" for s in seeds]
            total = f"{st['mean']:{sign}.2f} ± {st['std']:.2f}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {total} |")
        lines.append("")
    return lines


def pareto(rows: Sequence[Mapping[str, Any]], metric: str, higher: bool) -> List[Mapping[str, Any]]:
    """The rows no other row dominates (BOPs no higher and the metric better, or BOPs lower
    and the metric no worse), by increasing BOPs."""
    def point(r):
        return r["relative_bops"]["mean"], r["metrics"][metric]["mean"]

    def dominates(a, b):
        (ba, ma), (bb, mb) = point(a), point(b)
        return (ba <= bb and _better(ma, mb, higher)) or (ba < bb and not _better(mb, ma, higher))

    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: point(r)[0])


# ============================================================================ plotting
_STYLE = {"dense": ("k", "*"), "geta": ("tab:red", "o"), "geta_kd": ("tab:orange", "o"),
          "qat": ("tab:purple", "^"), "prune": ("tab:green", "s"),
          "sequential": ("tab:blue", "D"), "sequential_kd": ("tab:olive", "D")}


def plot(per_dataset: Mapping[str, Sequence[Mapping[str, Any]]], metric: str, ylabel: str,
         path: str, title: str, log_y: bool = False) -> str:
    """``metric`` against relative BOPs (log x), one panel per dataset, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(per_dataset)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 4.8), squeeze=False)
    for ax, (dataset, rows) in zip(axes[0], per_dataset.items()):
        seen = set()
        for r in rows:
            color, marker = _STYLE.get(r["method"], ("gray", "x"))
            if r["key"].startswith("magprune"):
                color, marker = "tab:cyan", "s"
            label = r["label"] if r["label"] not in seen else None
            seen.add(r["label"])
            face = "none" if r["key"].endswith("-max") else color
            ax.errorbar(r["relative_bops"]["mean"], r["metrics"][metric]["mean"],
                        yerr=r["metrics"][metric]["std"] or None, fmt=marker, color=color,
                        mfc=face, ms=8, capsize=3, label=label)
            ax.annotate(r["key"], (r["relative_bops"]["mean"], r["metrics"][metric]["mean"]),
                        fontsize=6, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("relative BOPs (dense fp32 = 1, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {dataset}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_bits(records: Sequence[Mapping[str, Any]], path: str, title: str) -> Optional[str]:
    """Learned weight bits per layer of every GETA-style run (seed 0, or the first seed), as a
    heat map: one row per run, one column per linear layer, the bit width written in each cell."""
    runs = {}
    for rec in sorted(records, key=lambda r: r["seed"]):
        if rec.get("layer_bits") and rec["method"] in ("geta", "geta_kd", "qat"):
            runs.setdefault((rec["dataset"], rec["run"]), rec)
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(next(iter(runs.values()))["layer_bits"])
    grid = [[rec["layer_bits"].get(n, {}).get("weight") or 0 for n in layers]
            for rec in runs.values()]
    fig, ax = plt.subplots(figsize=(3.5 + 0.26 * len(layers), 1.6 + 0.32 * len(runs)))
    image = ax.imshow(grid, cmap="viridis", vmin=2, vmax=max(max(r) for r in grid), aspect="auto")
    for i, row in enumerate(grid):
        for j, bits in enumerate(row):
            ax.text(j, i, str(bits), ha="center", va="center", fontsize=6,
                    color="white" if bits < 6 else "black")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([n.replace("bert.encoder.layer.", "L").replace("model.layers.", "L")
                        for n in layers], rotation=90, fontsize=6)
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([f"{name} (seed {rec['seed']})" if len({d for d, _ in runs}) == 1
                        else f"{dataset}: {name} (seed {rec['seed']})"
                        for (dataset, name), rec in runs.items()], fontsize=7)
    fig.colorbar(image, ax=ax, label="learned weight bits", fraction=0.02)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ============================================================================ results.md
INDEX_INTRO = """# Joint GETA vs. sequential pruning-then-quantization: results

Issue #9 asks whether GETA's joint structured pruning + mixed-precision QAT beats the obvious
sequential pipeline (fine-tune, prune, fine-tune, quantize after training) when both get the same
data and the same number of optimizer steps. The sections below are written by
`scripts/study_qa.py` (MiniLM-L6 extractive QA) and `scripts/study_lm.py` (SmolLM2-135M causal
LM) from the JSON records they keep under `docs/study-runs/`; every number is a measurement of
a real run on this repository's 2-core CPU machine, and rerunning the commands shown regenerates
them (finished runs are reused, so an interrupted study resumes).
"""

SECTIONS = ("results_qa.md", "results_lm.md")


def write_index(out_dir: str) -> str:
    """``results.md``: the intro followed by every section file present in ``out_dir``."""
    parts = [INDEX_INTRO]
    for name in SECTIONS:
        p = os.path.join(out_dir, name)
        if os.path.exists(p):
            with open(p) as f:
                parts.append(f.read().strip() + "\n")
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


METHOD_TEXT = """Methods (each gets the same {steps} optimizer steps, batch {batch}, learning rate
{lr:g}, constant LR after a 10% warm-up, the same data and seed):

- **dense fine-tuning (fp32)**: `transformers.Trainer`, the reference (relative BOPs 1).
- **GETA joint**: `GETATrainer`, stages warm-up {warmup:.0%} / projection {projection:.0%} /
  joint {joint:.0%} / cool-down; {pp} projection periods, {prp} pruning periods; unit saliency
  from the one-step update (`importance_source="update"`, the paper's). Weight bits start
  at 16 (at most) and the upper bound falls by {br} per projection period to the target's upper
  bound (`weight_bits=(4, 16), bit_reduction={br}` for the target `w [4,8]`); activation bits use
  the target range as given under the same schedule, so `a [8,16]` ends at 8 bits. The model is
  compressed (`compress_model`: units removed, weights bit-packed) before it is measured.
  A setting marked `BOPs<=0.2` sets `target_relative_bops=0.2`: when the bits freeze, weight
  layers lose bits where the Fisher-weighted quantization error per BOP saved is smallest until
  the estimated relative BOPs meet 0.2 (`geta_hf/optim/budget.py`).
- **GETA joint + KD**: the same, distilling from this seed's final dense model (logit KD on
  start and end logits, weight {kd_w:g}, temperature {kd_t:g}).
- **QAT only**: the same `GETATrainer` run with `target_group_sparsity=0`.
- **pruning only (QASSO, fp32)**: `QASSO` (GETA's pruning stages and saliency scores) on the
  model without quantizers, under the plain `Trainer`; then physically compressed.
- **magnitude pruning + fine-tuning (fp32)** and **sequential, PTQ max / mse clip**: the
  sequential baseline. The first {half} steps of the dense run (same schedule, same batches),
  then the same number of units as GETA's target (`floor(sparsity x units)`, every family
  keeping at least one unit) with the smallest RMS weight magnitude in the same QADG families
  are zeroed, {rest} more fine-tuning steps keep them at zero (fresh optimizer, a new data
  order), and the model is quantized after training to the per-layer weight (and input) bits
  GETA learned at the same sparsity and target on the same seed, so BOPs match; weight clips
  are `max|W|` ("max") or the MSE-optimal clip (`geta_hf.quant.calibrate.mse_clip`, "mse"), input ranges the
  maximum of `|x|` on {calib} training batch(es). The fp32 model before quantization is measured
  too (a second pruning-only baseline). **sequential + KD** distils from the dense model in its
  fine-tuning half (same KD settings) and takes the bits of the GETA + KD run.

Columns: "units removed" is the measured fraction of heads / kv-groups / MLP channels removed;
"avg bits w / a" the parameter-weighted mean weight bits of the linear layers (which includes
the task head) and the mean input bits; relative BOPs (`model_stats`: MACs x weight bits x
input bits, attention products at 32 x 32, vs. the dense fp32 model) and parameters are
counted on the evaluation batch shape given below; "size on disk" is the saved
`model.safetensors` (bit-packed codes for compressed models; the embeddings stay fp32); CPU
latency is the median of 5 forward passes (`geta_hf.examples.tasks.latency`, {threads} thread(s)).
Values are the mean (± sample standard deviation when more than one seed ran).
"""


def method_text(hp: Hyper, calib: int, records: Sequence[Mapping[str, Any]] = ()) -> str:
    threads = sorted({str(r.get("environment", {}).get("threads", "?")) for r in records}) or ["?"]
    return METHOD_TEXT.format(threads="/".join(threads),
        steps=hp.steps, batch=hp.batch_size, lr=hp.learning_rate, warmup=STAGES["warmup"],
        projection=STAGES["projection"], joint=STAGES["joint"], pp=STAGES["projection_periods"],
        prp=STAGES["pruning_periods"], br=BIT_REDUCTION, half=hp.steps // 2,
        rest=hp.steps - hp.steps // 2, calib=calib, kd_w=KD["weight"], kd_t=KD["temperature"])


VARIANT_WORDS = {
    "importance_source": "saliency from", "importance_weights": "saliency weights",
    "warmup": "warm-up", "projection": "projection", "joint": "joint",
    "projection_periods": "projection periods", "pruning_periods": "pruning periods",
    "kd_weight": "KD weight",
}


def variants_text(records: Sequence[Mapping[str, Any]]) -> str:
    """What each ``[variant X]`` in the table changes (from the stored records), or ""."""
    seen: Dict[str, Mapping[str, Any]] = {}
    for r in records:
        v = r.get("variant") or {}
        if v.get("name"):
            seen.setdefault(v["name"], v)
    if not seen:
        return ""
    lines = ["Variants: a row marked `[variant X]` departs from the GETA arms above only in what",
             "is listed (the sequential arms of that setting take its bits; `sal-grad-1p` is the",
             "library's default `GETAConfig` since #14, `docs/method.md` §7.5):", ""]
    for name, v in sorted(seen.items()):
        parts = [f"{VARIANT_WORDS.get(k, k)} {val}" for k, val in v.items() if k != "name"]
        lines.append(f"- `{name}`: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def seeds_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """A caution when the table rests on one seed."""
    if rows and max(len(r["seeds"]) for r in rows) > 1:
        return ""
    return ("One seed only: differences of a few points between rows may be run-to-run noise; "
            "rerun with `--seeds 0,1,2` for means and spreads.")


def run_time_text(records: Sequence[Mapping[str, Any]]) -> str:
    """Total and per-dataset compute time of the stored runs."""
    per: Dict[str, float] = {}
    for r in records:
        per[r["dataset"]] = per.get(r["dataset"], 0.0) + float(r["seconds"])
    total = sum(per.values())
    parts = ", ".join(f"{d} {s / 60:.1f} min" for d, s in per.items())
    return f"{total / 60:.1f} min of runs in total ({parts})"


def data_sizes(records: Sequence[Mapping[str, Any]], dataset: str) -> Dict[str, Any]:
    """The data description stored with the runs of ``dataset`` (empty if none)."""
    for r in records:
        if r["dataset"] == dataset and r.get("data"):
            return r["data"]
    return {}


def commands_text(records: Sequence[Mapping[str, Any]]) -> str:
    cmds = list(dict.fromkeys(r["command"] for r in records))
    return "\n".join(["```bash"] + cmds + ["```"])


def finite_rows(records: Sequence[Mapping[str, Any]]) -> bool:
    """True when every stored row has finite numbers (used by the tests)."""
    for rec in records:
        for row in rec["rows"]:
            vals = list(row["metrics"].values()) + [row["relative_bops"], row["size_bytes"],
                                                    row["latency_ms"], row["params"]]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
                return False
    return True


def render_section(store: RunStore, study: str, *, heading: str, metrics: Sequence[str],
                   metric_titles: Mapping[str, str], metric: str, metric_title: str, higher: bool,
                   ylabel: str, plot_title: str, model_text: str, data_text: Callable[[str, Dict], str],
                   hp: Hyper, calibration_batches: int, out_dir: str, log_y: bool = False) -> str:
    """Write ``results_{study}.md`` and ``study_{study}.png`` from every stored run of ``study``,
    then ``results.md``; returns the path of ``results.md``."""
    records = store.records(study)
    per = aggregate(records, metrics)
    lines = [heading, ""]
    if not per:
        lines.append("No finished runs yet.")
    else:
        png = plot(per, metric, ylabel, os.path.join(out_dir, f"study_{study}.png"), plot_title,
                   log_y=log_y)
        lines += [f"Produced by (run time: {run_time_text(records)}, 2-core CPU):", "",
                  commands_text(records), "", method_text(hp, calibration_batches, records),
                  variants_text(records), model_text, "",
                  f"![{ylabel} vs relative BOPs]({os.path.basename(png)})", ""]
        bits_png = plot_layer_bits(records, os.path.join(out_dir, f"bits_{study}.png"),
                                   "Learned per-layer weight bits")
        if bits_png:
            lines += [f"![learned per-layer weight bits]({os.path.basename(bits_png)})", ""]
        for dataset, rows in per.items():
            lines += [f"### {dataset}", "", data_text(dataset, data_sizes(records, dataset)), "",
                      table(rows, metrics, metric_titles), "", seeds_note(rows), "",
                      "**Joint vs. sequential at matched settings** (computed from the table):", ""]
            lines += (verdict(rows, metric, metric_title, higher,
                              per_seed(records, dataset, metric))
                      or ["- no matched GETA / sequential pair yet"])
            lines.append("")
            paired = seed_tables(records, dataset, rows, metric, metric_title, higher)
            if paired:
                lines += ["**Per seed** (settings run on more than one seed; same seed = same "
                          "initial head, data order and teacher):", ""] + paired
    with open(os.path.join(out_dir, f"results_{study}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return write_index(out_dir)
