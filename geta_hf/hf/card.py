"""The model card of a compressed checkpoint, built with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import json
import os
from typing import Any, List, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..compress.report import format_stats_table
from ..surgery import CompressedArch

__all__ = ["model_card", "GETA_TAGS", "task_of"]

#: tags every GETA-compressed checkpoint (and the Trainer's card of a GETA run) carries
GETA_TAGS = ("geta", "geta-hf", "pruned", "quantized", "mixed-precision")
_TASKS = (("ForQuestionAnswering", "question-answering"),
          ("ForSequenceClassification", "text-classification"),
          ("ForTokenClassification", "token-classification"),
          ("ForCausalLM", "text-generation"), ("ForMaskedLM", "fill-mask"),
          ("ForConditionalGeneration", "text2text-generation"),
          ("ForImageClassification", "image-classification"))


def task_of(model: nn.Module) -> Optional[str]:
    """The Hub task of an HF model class (``BertForQuestionAnswering`` -> question-answering)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), None)


def _base_model_name(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or None
    if name and os.path.isabs(name):  # a local path says nothing to readers of the card
        return os.path.basename(name.rstrip("/")) or None
    return name


def _card_data(model: nn.Module, base: Optional[str], eval_results, dataset, license_):
    task = task_of(model)
    hub_base = base if base and "/" in base else None  # only a Hub id is a valid base_model
    results: List[EvalResult] = []
    if eval_results and dataset and task:
        results = [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset,
                              metric_type=k.removeprefix("eval_"), metric_value=float(v))
                   for k, v in eval_results.items()]
    extra = {"base_model_relation": "quantized"} if hub_base else {}
    return ModelCardData(
        library_name="transformers", base_model=hub_base, license=license_,
        tags=list(GETA_TAGS) + ([task] if task else []), pipeline_tag=task,
        datasets=[dataset] if dataset else None,
        metrics=sorted({k.removeprefix("eval_") for k in eval_results}) if eval_results else None,
        model_name=f"{type(model).__name__} compressed with GETA" if results else None,
        eval_results=results or None, **extra)


def _body(model: nn.Module, base: str, stats, eval_results, geta_config) -> List[str]:
    arch = CompressedArch.of(model) or CompressedArch()
    cls = type(model).__name__
    lines = [f"# {cls} compressed with GETA", "",
             f"Base model: `{base}`. Task head: `{cls}`. This checkpoint was pruned (whole "
             "attention heads / GQA kv-groups / MLP channels removed, per layer) and quantized "
             "with per-layer learned bit widths by geta-hf (GETA, Qu et al., CVPR 2025).", "",
             "## How to load it", "", "```python",
             "# pip install geta-hf",
             "import geta_hf  # registers the 'geta' quantization method",
             "from transformers import AutoModel  # or the task's AutoModelFor* class",
             "model = AutoModel.from_pretrained(\"<this folder or repo>\")", "```", ""]
    if stats:
        lines += ["## Compression", "", format_stats_table(stats), ""]
    fams = arch.families
    if fams:
        lines += ["## Heads and channels kept", "", "| family | kind | kept | of |",
                  "|---|---|---:|---:|"]
        lines += [f"| {n} | {f['kind']} | {len(f['kept'])} | {f['units']} |" for n, f in fams.items()]
        lines.append("")
    packed = arch.packed_layers
    if packed:
        lines += ["## Weight bits per layer", "", "| layer | bits |", "|---|---:|"]
        lines += [f"| {n} | {b} |" for n, b in packed.items()] + [""]
    if eval_results:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in eval_results.items()] + [""]
    if geta_config:
        lines += ["## GETA settings", "", "```json", json.dumps(dict(geta_config), indent=1,
                                                                 sort_keys=True), "```", ""]
    return lines


def model_card(model: nn.Module, stats: Optional[Mapping[str, Any]] = None,
               eval_results: Optional[Mapping[str, float]] = None,
               geta_config: Optional[Mapping[str, Any]] = None,
               base_model: Optional[str] = None, dataset: Optional[str] = None,
               license: Optional[str] = None) -> str:
    """The ``README.md`` of a compressed checkpoint: Hub metadata (``library_name``,
    ``base_model`` with ``base_model_relation: quantized`` when it is a Hub id, tags, the task,
    ``datasets``, ``metrics``, a ``model-index`` when ``eval_results`` on ``dataset`` are
    given, ``license``) and a body with how to load it and the per-layer compression."""
    base = base_model or _base_model_name(model) or "unknown"
    data = _card_data(model, base if base != "unknown" else None, eval_results, dataset, license)
    text = "\n".join(["---", data.to_yaml(), "---", ""]
                     + _body(model, base, stats, eval_results, geta_config))
    return str(ModelCard(text))
