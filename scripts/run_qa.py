#!/usr/bin/env python
"""Fine-tune a model for extractive QA (SQuAD) with GETA and save the compressed model.

The shape Hugging Face users know from `examples/pytorch/question-answering/run_qa.py`: model,
data and training arguments on the command line (`HfArgumentParser`), the GETA knobs as
`--geta_*` flags of `GETATrainingArguments`.

Offline (this repository's CI), on a SQuAD JSON file split by article:

    python scripts/run_qa.py --model_name_or_path <dir> --train_file squad-v2-dev-slice.json \
        --split_by_article 0.34 --output_dir out --max_steps 20 --geta_target_group_sparsity 0.3

On a GPU machine with the Hub reachable, the full bert-base-uncased SQuAD v1.1 recipe (README):

    python scripts/run_qa.py --model_name_or_path bert-base-uncased --dataset_name squad \
        --max_seq_length 384 --doc_stride 128 --per_device_train_batch_size 32 \
        --learning_rate 5e-5 --num_train_epochs 4 --output_dir out/bert-squad-geta \
        --geta_target_group_sparsity 0.4 --geta_weight_bits 4 16 --geta_bit_reduction 2 \
        --geta_warmup 0.05 --geta_projection 0.2 --geta_joint 0.4 --geta_pruning_periods 10

Results (EM/F1 of the trained fake-quantized model and of the compressed model reloaded from disk,
parameters, BOPs, size, latency) are printed and written to `<output_dir>/qa_results.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import transformers
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, HfArgumentParser

import geta_hf
from geta_hf import GETATrainer, GETATrainingArguments
from geta_hf.data import generate_squad, load_squad_json, split_by_article
from geta_hf.tasks import build_features, evaluate_qa, example_batch, latency

logger = logging.getLogger("run_qa")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Model path or Hub id (a QA head is added if missing)."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "A Hub dataset in SQuAD format, e.g. 'squad' (needs network)."})
    train_file: Optional[str] = field(default=None, metadata={"help": "SQuAD v1.1/v2 JSON for training."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "SQuAD v1.1/v2 JSON for evaluation."})
    split_by_article: Optional[float] = field(default=None, metadata={
        "help": "Without --validation_file: hold out this fraction of the train file's articles."})
    synthetic: bool = field(default=False, metadata={
        "help": "Use the built-in offline SQuAD-format generator (no files needed)."})
    synthetic_train: int = field(default=2000, metadata={"help": "Generated training questions."})
    synthetic_eval: int = field(default=500, metadata={"help": "Generated evaluation questions."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per feature (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Overlap between windows of a long context."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates in post-processing."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer in tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the evaluation examples."})
    compressed_dir: Optional[str] = field(default=None, metadata={
        "help": "Where the compressed model goes (default: <output_dir>/compressed)."})


def load_examples(data: DataArguments, seed: int):
    """(train, eval) SQuAD example Datasets (answerable questions only)."""
    if data.synthetic:
        train, evald = generate_squad(data.synthetic_train, data.synthetic_eval, seed=seed)
        return load_squad_json(train), load_squad_json(evald)
    if data.dataset_name:
        import datasets

        raw = datasets.load_dataset(data.dataset_name)
        return raw["train"], raw["validation"]
    if not data.train_file:
        raise SystemExit("run_qa: give --dataset_name, --train_file or --synthetic")
    train = load_squad_json(data.train_file)
    if data.validation_file:
        return train, load_squad_json(data.validation_file)
    if data.split_by_article is None:
        raise SystemExit("run_qa: give --validation_file or --split_by_article FRACTION")
    return split_by_article(train, eval_fraction=data.split_by_article, seed=seed)


def main(argv=None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, GETATrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        margs, data, targs = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        margs, data, targs = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if targs.should_log else logging.WARNING)
    transformers.set_seed(targs.seed)

    train_ex, eval_ex = load_examples(data, targs.seed)
    if data.max_train_samples:
        train_ex = train_ex.select(range(min(data.max_train_samples, len(train_ex))))
    if data.max_eval_samples:
        eval_ex = eval_ex.select(range(min(data.max_eval_samples, len(eval_ex))))
    logger.info("examples: %d train, %d eval", len(train_ex), len(eval_ex))

    tokenizer = AutoTokenizer.from_pretrained(margs.tokenizer_name or margs.model_name_or_path)
    model = AutoModelForQuestionAnswering.from_pretrained(margs.model_name_or_path)
    feats = build_features(tokenizer, train_ex, eval_ex, data.max_seq_length, data.doc_stride)

    trainer = GETATrainer(model=model, args=targs, train_dataset=feats.train,
                          processing_class=tokenizer)
    trainer.train()

    scores = {"trained": evaluate_qa(model, eval_ex, feats.eval, targs.per_device_eval_batch_size,
                                     data.n_best_size, data.max_answer_length)}
    out_dir = data.compressed_dir or os.path.join(targs.output_dir, "compressed")
    trainer.save_compressed(out_dir, eval_results={f"eval_{k}": v for k, v in scores["trained"].items()})
    result = {"scores": scores, "compressed_dir": out_dir}
    if trainer.is_world_process_zero():
        small = AutoModelForQuestionAnswering.from_pretrained(out_dir)  # what users will load
        scores["compressed"] = evaluate_qa(small, eval_ex, feats.eval, targs.per_device_eval_batch_size,
                                           data.n_best_size, data.max_answer_length)
        batch = example_batch(feats.eval, 8)
        stats = geta_hf.model_stats(small, batch)
        result.update({
            "params": stats["params"], "relative_params": stats["relative"]["params"],
            "relative_bops": stats["relative"]["bops"], "avg_weight_bits": stats["avg_weight_bits"],
            "size_on_disk_bytes": os.path.getsize(os.path.join(out_dir, "model.safetensors")),
            "latency_s_batch8": latency(small, batch),
            "geta": trainer.geta_metrics(),
        })
        print(f"EM/F1 trained (fake-quant): {scores['trained']['exact_match']:.2f} / "
              f"{scores['trained']['f1']:.2f}; compressed (reloaded): "
              f"{scores['compressed']['exact_match']:.2f} / {scores['compressed']['f1']:.2f}; "
              f"relative BOPs {result['relative_bops']:.4f}; params {result['relative_params']:.3f}x")
        with open(os.path.join(targs.output_dir, "qa_results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2)) if not torch.cuda.is_available() else
                          torch.get_num_threads())
    main()
