import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM-L6 QA model and tokenizer (loaded once per session)."""
    from tiny_models import minilm_qa

    return minilm_qa()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (Llama, GQA), loaded once per session (about 20 s)."""
    from tiny_models import smollm2

    return smollm2()
