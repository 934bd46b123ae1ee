"""SQuAD evaluation inside the Hugging Face `Trainer`: EM/F1 as ``eval_*`` metrics.

`QuestionAnsweringMixin` overrides the public ``evaluate``/``predict``/``evaluation_loop`` hooks
(as transformers' example ``QuestionAnsweringTrainer`` does): the evaluation features keep the
columns that map logits back to text (``example_id``, ``offset_mapping``, ``cls_index``), the
model sees only its inputs, and after the Trainer's own loop the logits are post-processed
(:func:`geta_hf.examples.data.postprocess_qa_predictions`) and scored (:func:`squad_scores`). So
``eval_exact_match``/``eval_f1`` are logged (TensorBoard, W&B, ``trainer.state.log_history``),
usable as ``metric_for_best_model`` and written by ``save_metrics``.

Mix it in front of any Trainer: ``class QATrainer(QuestionAnsweringMixin, GETATrainer)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput, PredictionOutput

from ..data.qa import QAPredictions, postprocess_qa_predictions, squad_v2_metrics

__all__ = ["QuestionAnsweringMixin", "QuestionAnsweringTrainer", "squad_scores",
           "POSTPROCESS_COLUMNS"]

#: evaluation-feature columns used by post-processing, never fed to the model
POSTPROCESS_COLUMNS = ("example_id", "offset_mapping", "cls_index")


def _answer_texts(answers: Any) -> list:
    return list(answers["text"] if isinstance(answers, dict) else answers)


def squad_scores(predictions: Dict[str, str], examples,
                 version_2_with_negative: bool = False) -> Dict[str, float]:
    """EM/F1 (0-100) of ``{id: answer}`` against SQuAD ``examples`` (a Dataset or rows with
    ``id`` and ``answers``).

    SQuAD v1.1: torchmetrics' maintained ``squad`` metric (``exact_match``, ``f1``); every
    example needs a reference answer. SQuAD v2.0 (torchmetrics has none):
    :func:`geta_hf.examples.data.squad_v2_metrics` (``exact_match``, ``f1``, ``total`` and the
    ``HasAns_*``/``NoAns_*`` scores).
    """
    if version_2_with_negative:
        return squad_v2_metrics(predictions, examples)
    try:
        from torchmetrics.functional.text import squad
    except ImportError as e:  # pragma: no cover - torchmetrics is in the examples/test extras
        raise ImportError("SQuAD v1.1 scoring uses torchmetrics: pip install 'geta-hf[examples]'") from e
    rows = [(r["id"], r["answers"]) for r in examples]  # a Dataset or a list of rows
    ids, answers = [r[0] for r in rows], [r[1] for r in rows]
    empty = [i for i, a in zip(ids, answers) if not _answer_texts(a)]
    if empty:
        raise ValueError(f"{len(empty)} evaluation example(s) have no answer (e.g. id {empty[0]!r}): "
                         "unanswerable questions need SQuAD v2 scoring (--version_2_with_negative)")
    out = squad([{"id": i, "prediction_text": predictions.get(i, "")} for i in ids],
                [{"id": i, "answers": {"text": _answer_texts(a)}} for i, a in zip(ids, answers)])
    return {"exact_match": float(out["exact_match"]), "f1": float(out["f1"])}


@dataclass
class _QAPass:
    """The examples/features of the evaluation in progress, and its post-processed output."""

    examples: Any
    features: Any
    result: Optional[QAPredictions] = None


def _model_inputs(features):
    """``features`` without the post-processing columns (what the model's forward consumes)."""
    drop = [c for c in POSTPROCESS_COLUMNS if c in getattr(features, "column_names", ())]
    return features.remove_columns(drop) if drop else features


class QuestionAnsweringMixin:
    """Trainer mixin: SQuAD post-processing and EM/F1 in ``evaluate``/``predict``.

    Keyword arguments (the rest go to the Trainer): ``eval_examples`` (the SQuAD examples that
    ``eval_dataset``'s features were made from, by :func:`geta_hf.examples.data.prepare_eval_features`),
    ``version_2_with_negative`` and ``null_score_diff_threshold`` (SQuAD v2 null answers),
    ``n_best_size`` and ``max_answer_length`` (span search).

    ``evaluate(eval_dataset=None, ..., eval_examples=None)`` returns the Trainer's metrics plus
    ``{prefix}_exact_match``/``{prefix}_f1`` (and for v2 ``{prefix}_HasAns_f1`` etc.), logged and
    passed to the callbacks like any Trainer metric. ``predict(test_dataset, ...,
    test_examples=...)`` returns a ``PredictionOutput`` whose ``predictions`` is the
    :class:`geta_hf.examples.data.QAPredictions` (answers, n-best lists, null odds) and whose metrics hold
    EM/F1 when the examples have an ``answers`` column.
    """

    def __init__(self, *args, eval_examples=None, version_2_with_negative: bool = False,
                 null_score_diff_threshold: float = 0.0, n_best_size: int = 20,
                 max_answer_length: int = 30, **kwargs) -> None:
        if n_best_size < 1 or max_answer_length < 1:
            raise ValueError(f"QuestionAnsweringMixin: n_best_size ({n_best_size}) and "
                             f"max_answer_length ({max_answer_length}) must be >= 1")
        self.eval_examples = eval_examples
        self.version_2_with_negative = bool(version_2_with_negative)
        self.null_score_diff_threshold = float(null_score_diff_threshold)
        self.n_best_size = int(n_best_size)
        self.max_answer_length = int(max_answer_length)
        self._qa_pass: Optional[_QAPass] = None
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def _qa(self, examples, features, where: str):
        if features is None or examples is None:
            raise ValueError(f"{type(self).__name__}.{where}: needs the evaluation features and "
                             "the SQuAD examples they were made from (eval_dataset= / eval_examples=)")
        if isinstance(features, dict):
            raise ValueError(f"{type(self).__name__}.{where}: one evaluation set at a time (got a "
                             "dict of datasets)")
        missing = [c for c in ("example_id", "offset_mapping") if c not in features.column_names]
        if missing:
            raise KeyError(f"{type(self).__name__}.{where}: the features have no {missing} column(s); "
                           "make them with geta_hf.examples.data.prepare_eval_features")
        self._qa_pass = _QAPass(examples, features)
        try:
            yield self._qa_pass
        finally:
            self._qa_pass = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval",
                 eval_examples=None) -> Dict[str, float]:
        """`Trainer.evaluate` plus SQuAD EM/F1 (see the class docstring)."""
        features = self.eval_dataset if eval_dataset is None else eval_dataset
        examples = self.eval_examples if eval_examples is None else eval_examples
        with self._qa(examples, features, "evaluate"):
            return super().evaluate(_model_inputs(features), ignore_keys, metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test",
                test_examples=None) -> PredictionOutput:
        """`Trainer.predict`; ``predictions`` is the post-processed :class:`QAPredictions`."""
        with self._qa(test_examples, test_dataset, "predict") as qa:
            out = super().predict(_model_inputs(test_dataset), ignore_keys, metric_key_prefix)
            return PredictionOutput(predictions=qa.result, label_ids=None, metrics=out.metrics)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """The Trainer's loop (logits gathered from every process), then post-processing and
        EM/F1 added to its metrics under ``metric_key_prefix``."""
        qa = self._qa_pass
        if qa is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only,
                                           ignore_keys, metric_key_prefix)
        out = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        qa.result = postprocess_qa_predictions(
            qa.examples, qa.features, out.predictions, n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length,
            version_2_with_negative=self.version_2_with_negative,
            null_score_diff_threshold=self.null_score_diff_threshold)
        metrics = dict(out.metrics)
        if "answers" in qa.examples.column_names:
            scores = squad_scores(qa.result.predictions, qa.examples, self.version_2_with_negative)
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return EvalLoopOutput(predictions=out.predictions, label_ids=out.label_ids, metrics=metrics,
                              num_samples=out.num_samples)


class QuestionAnsweringTrainer(QuestionAnsweringMixin, Trainer):
    """`transformers.Trainer` with SQuAD EM/F1 in ``evaluate``/``predict`` (e.g. to evaluate a
    compressed checkpoint); see :class:`QuestionAnsweringMixin`."""
