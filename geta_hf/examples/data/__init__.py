"""Extractive-QA data: an offline SQuAD-format generator, SQuAD JSON I/O, and the HF QA pipeline."""

from .qa import (
    QAPredictions, normalize_answer, postprocess_predictions, postprocess_qa_predictions,
    prepare_eval_features, prepare_train_features, squad_metrics, squad_v2_metrics,
)
from .synthetic_squad import (
    SquadFormatError, entity_pools, generate_squad, load_squad_json, split_by_article,
    write_squad_json,
)

__all__ = [
    "generate_squad", "entity_pools", "write_squad_json", "load_squad_json", "split_by_article",
    "SquadFormatError", "prepare_train_features", "prepare_eval_features",
    "postprocess_predictions", "postprocess_qa_predictions", "QAPredictions", "squad_metrics",
    "squad_v2_metrics", "normalize_answer",
]
