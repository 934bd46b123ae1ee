"""Task-level helpers shared by the example scripts, the demo and the studies."""

from .qa import MODEL_COLUMNS, QAFeatures, build_features, evaluate_qa, example_batch, latency

__all__ = ["QAFeatures", "build_features", "evaluate_qa", "latency", "example_batch", "MODEL_COLUMNS"]
