"""Task-level helpers shared by the example scripts, the demo and the studies."""

from .qa import MODEL_COLUMNS, QAFeatures, build_features, evaluate_qa, example_batch, latency
from .qa_trainer import POSTPROCESS_COLUMNS, QuestionAnsweringMixin, QuestionAnsweringTrainer, squad_scores

__all__ = ["QAFeatures", "build_features", "evaluate_qa", "latency", "example_batch", "MODEL_COLUMNS",
           "QuestionAnsweringMixin", "QuestionAnsweringTrainer", "squad_scores", "POSTPROCESS_COLUMNS"]
