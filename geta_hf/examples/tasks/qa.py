"""Extractive question answering end to end: features, evaluation (EM/F1) and latency.

Shared by ``scripts/run_qa.py``, ``geta-hf demo`` and the study scripts, so that every number
they print comes from the same code.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping

import torch
from torch import nn

from ..data.qa import postprocess_predictions, prepare_eval_features, prepare_train_features, squad_metrics

__all__ = ["QAFeatures", "build_features", "evaluate_qa", "latency", "MODEL_COLUMNS"]

#: the columns a BERT-style QA model consumes
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class QAFeatures:
    """Tokenized training and evaluation features, plus the evaluation examples they came from."""

    train: Any  # datasets.Dataset with start/end positions (or None)
    eval: Any  # datasets.Dataset with example_id / offset_mapping (or None)
    eval_examples: Any  # datasets.Dataset of SQuAD examples (or None)


def build_features(tokenizer, train_examples=None, eval_examples=None, max_length: int = 384,
                   doc_stride: int = 128) -> QAFeatures:
    """Tokenize SQuAD-style ``datasets.Dataset`` splits with the standard sliding window."""
    train = evalf = None
    if train_examples is not None:
        train = train_examples.map(
            prepare_train_features, batched=True, remove_columns=train_examples.column_names,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "doc_stride": doc_stride},
            desc="tokenizing train")
        train.set_format("torch")
    if eval_examples is not None:
        evalf = eval_examples.map(
            prepare_eval_features, batched=True, remove_columns=eval_examples.column_names,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "doc_stride": doc_stride},
            desc="tokenizing eval")
    return QAFeatures(train=train, eval=evalf, eval_examples=eval_examples)


@torch.no_grad()
def evaluate_qa(model: nn.Module, eval_examples, eval_features, batch_size: int = 32,
                n_best_size: int = 20, max_answer_length: int = 30) -> Dict[str, float]:
    """Exact match and F1 (0-100) of ``model`` on SQuAD-style evaluation features.

    Runs the model in eval mode over the features, maps the best spans back to answer text with
    :func:`geta_hf.examples.data.postprocess_predictions` and scores them with
    :func:`geta_hf.examples.data.squad_metrics`.
    """
    was_training = model.training
    model.eval()
    cols = [c for c in MODEL_COLUMNS if c in eval_features.column_names]
    data = eval_features.with_format("torch", columns=cols)
    starts, ends = [], []
    try:
        for i in range(0, len(data), batch_size):
            batch = data[i:i + batch_size]
            out = model(**{k: batch[k] for k in cols})
            starts.append(out.start_logits.float().cpu())
            ends.append(out.end_logits.float().cpu())
    finally:
        model.train(was_training)
    preds = postprocess_predictions(eval_examples, eval_features, torch.cat(starts), torch.cat(ends),
                                    n_best_size=n_best_size, max_answer_length=max_answer_length)
    return squad_metrics(preds, eval_examples)


@torch.inference_mode()
def latency(model: nn.Module, batch: Mapping[str, torch.Tensor], reps: int = 5) -> float:
    """Median seconds of one inference forward pass on ``batch`` (after one warm-up pass)."""
    was_training = model.training
    model.eval()
    try:
        model(**batch)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times)


def example_batch(features, batch_size: int = 8, columns=MODEL_COLUMNS) -> Dict[str, torch.Tensor]:
    """The first ``batch_size`` features as model inputs."""
    cols = [c for c in columns if c in features.column_names]
    data = features.with_format("torch", columns=cols)[:batch_size]
    return {k: data[k] for k in cols}


__all__.append("example_batch")
