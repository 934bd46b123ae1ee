"""`report`: a markdown compression table plus PNG plots, from one call."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

from torch import nn

from .metrics import model_stats
from ..surgery import CompressedArch

__all__ = ["report", "format_stats_table"]


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_stats_table(stats: Mapping[str, Any]) -> str:
    """The headline table (markdown): absolute values and ratios to the dense fp32 model."""
    ref = stats.get("reference")
    rel = stats.get("relative", {})
    rows = [
        ("parameters", _fmt(stats["params"]), ref and _fmt(ref["params"]), rel.get("params")),
        ("MACs", _fmt(stats["macs"]), ref and _fmt(ref["macs"]), rel.get("macs")),
        ("BOPs", _fmt(stats["bops"]), ref and _fmt(ref["bops"]), rel.get("bops")),
        ("weight size", f"{stats['size_bits'] / 8 / 2**20:.2f} MiB",
         ref and f"{ref['size_bits'] / 8 / 2**20:.2f} MiB", rel.get("size")),
        ("average weight bits", f"{stats['avg_weight_bits']:.2f}", ref and "32.00",
         stats["avg_weight_bits"] / 32 if ref else None),
    ]
    lines = ["| metric | compressed | dense fp32 | ratio |", "|---|---:|---:|---:|"]
    for name, a, b, r in rows:
        lines.append(f"| {name} | {a} | {b or '-'} | {'-' if r is None else f'{r:.3f}'} |")
    return "\n".join(lines)


def _plots(stats: Mapping[str, Any], arch: Optional[CompressedArch], out_dir: str) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    lin = [r for r in stats["layers"] if r["kind"] == "linear"]
    if lin:
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(lin)), 3.4))
        xs = range(len(lin))
        ax.bar([x - 0.2 for x in xs], [r["weight_bits"] for r in lin], width=0.4, label="weight bits")
        ax.bar([x + 0.2 for x in xs], [r["act_bits"] for r in lin], width=0.4, label="input bits")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["name"].split(".", 2)[-1] for r in lin], rotation=90, fontsize=6)
        ax.set_ylabel("bits")
        ax.set_title("Bit width per layer")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["bits"] = os.path.join(out_dir, "bits_per_layer.png")
        fig.savefig(paths["bits"], dpi=120)
        plt.close(fig)
    fams = arch.families if arch is not None else {}
    if fams:
        names = list(fams)
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 3.4))
        kept = [len(fams[n]["kept"]) / fams[n]["units"] for n in names]
        colors = ["tab:orange" if fams[n]["kind"] != "channels" else "tab:blue" for n in names]
        ax.bar(range(len(names)), kept, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{n} ({len(fams[n]['kept'])}/{fams[n]['units']})" for n in names],
                           rotation=90, fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction kept")
        ax.set_title("Heads / kv-groups (orange) and MLP channels (blue) kept per layer")
        fig.tight_layout()
        paths["units"] = os.path.join(out_dir, "units_per_layer.png")
        fig.savefig(paths["units"], dpi=120)
        plt.close(fig)
    return paths


def report(model: nn.Module, example_inputs: Mapping[str, Any], out_dir: str, *,
           reference: Optional[nn.Module] = None, title: Optional[str] = None,
           eval_results: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """Write ``report.md``, ``report.json`` and PNG plots (bits per layer; units kept per layer).

    Returns ``{"stats": ..., "files": {name: path}, "markdown": str}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    stats = model_stats(model, example_inputs, reference=reference)
    arch = CompressedArch.of(model)
    files = _plots(stats, arch, out_dir)
    md = [f"# {title or 'GETA compression report'}", "", format_stats_table(stats), ""]
    if eval_results:
        md += ["| evaluation | value |", "|---|---:|"]
        md += [f"| {k} | {v:.4g} |" for k, v in eval_results.items()] + [""]
    fams = arch.families if arch is not None else {}
    if fams:
        md += ["## Units kept per layer", "", "| family | kind | kept | of |", "|---|---|---:|---:|"]
        md += [f"| {n} | {f['kind']} | {len(f['kept'])} | {f['units']} |" for n, f in fams.items()]
        md.append("")
    md += ["## Layers", "", "| layer | kind | weight bits | input bits | params | MACs | BOPs |",
           "|---|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['name']} | {r['kind']} | {r['weight_bits']} | {r['act_bits']} | {r['params']} | "
           f"{_fmt(r['macs'])} | {_fmt(r['bops'])} |" for r in stats["layers"]]
    for key, path in files.items():
        md += ["", f"![{key}]({os.path.basename(path)})"]
    text = "\n".join(md) + "\n"
    files["markdown"] = os.path.join(out_dir, "report.md")
    with open(files["markdown"], "w") as f:
        f.write(text)
    files["json"] = os.path.join(out_dir, "report.json")
    with open(files["json"], "w") as f:
        json.dump({"stats": stats, "eval": dict(eval_results or {})}, f, indent=1)
    return {"stats": stats, "files": files, "markdown": text}
