"""`report`: a markdown compression table plus PNG plots, from one call."""

from __future__ import annotations

import json
import os
import tempfile
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
    """Write ``report.md``, ``report.json`` and PNG plots (bits per layer; units kept per layer)
    into ``out_dir``, replacing a report written there before (each file is replaced whole,
    never left truncated). ``eval_results`` values must be numbers (``ValueError`` naming the
    key, before anything is written).

    Returns ``{"stats": ..., "files": {name: path}, "markdown": str}``.
    """
    evals = {k: _number(k, v) for k, v in (eval_results or {}).items()}  # before any write
    os.makedirs(out_dir, exist_ok=True)
    stats = model_stats(model, example_inputs, reference=reference)
    arch = CompressedArch.of(model)
    files = _plots(stats, arch, out_dir)
    md = [f"# {title or 'GETA compression report'}", "", format_stats_table(stats), ""]
    if evals:
        md += ["| evaluation | value |", "|---|---:|"]
        md += [f"| {k} | {v:.4g} |" for k, v in evals.items()] + [""]
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
    blob = json.dumps({"stats": stats, "eval": evals}, indent=1)
    files["markdown"] = _write_atomic(os.path.join(out_dir, "report.md"), text)
    files["json"] = _write_atomic(os.path.join(out_dir, "report.json"), blob)
    return {"stats": stats, "files": files, "markdown": text}


def _number(key: str, value: Any) -> float:
    """An evaluation value as a JSON number (numpy and 0-dim torch scalars included)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"report: eval_results[{key!r}]={value!r} is not a number") from None
    return out


def _write_atomic(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file beside it: ``path`` is either its old
    content or the new one, never a truncated file."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the report private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
