#!/usr/bin/env python
"""Fine-tune a model for extractive QA (SQuAD v1.1 / v2.0) with GETA and save the compressed model.

The flags of transformers' `examples/pytorch/question-answering/run_qa.py`: model, data and
training arguments on the command line (`HfArgumentParser`), `--do_train`, `--do_eval`,
`--do_predict`, `--version_2_with_negative`, `--null_score_diff_threshold`, `--push_to_hub`,
`--resume_from_checkpoint`; the GETA knobs as `--geta_*` flags of `GETATrainingArguments`.

* `--do_train` trains with `GETATrainer` (resuming from the newest complete `checkpoint-N` of
  `--output_dir` if there is one) and writes the compressed model to `<output_dir>/compressed`
  (or `--compressed_dir`); `--push_to_hub` uploads that compressed model with its card.
* `--do_eval` computes EM/F1 inside the Trainer's evaluation loop (`eval_exact_match`,
  `eval_f1`, and for SQuAD v2 `eval_HasAns_f1`/`eval_NoAns_f1`...): they are logged
  (TensorBoard, W&B, `trainer_state.json`), usable as `--metric_for_best_model f1`, and written to
  `eval_results.json`. After training, the compressed model reloaded from disk is evaluated too
  (`eval_compressed_*`). Without `--do_train`, `--model_name_or_path` may be a saved compressed
  checkpoint.
* `--do_predict` writes `predictions.json`, `nbest_predictions.json` (and for SQuAD v2
  `null_odds.json`) to `--output_dir`.

Offline (this repository's CI), on a SQuAD JSON file split by article:

    python scripts/run_qa.py --model_name_or_path <dir> --train_file squad-v2-dev-slice.json \
        --split_by_article 0.34 --do_train --do_eval --output_dir out --max_steps 20 \
        --geta_target_group_sparsity 0.3

The SQuAD files come from the official site (https://rajpurkar.github.io/SQuAD-explorer/) or
`--dataset_name squad` / `squad_v2` (needs the Hub). Multi-GPU / multi-process: `accelerate launch
scripts/run_qa.py ...` or `torchrun --nproc_per_node N scripts/run_qa.py ...`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import transformers
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, HfArgumentParser

import geta_hf
from geta_hf import GETATrainer, GETATrainingArguments
from geta_hf.compress import CompressedArch
from geta_hf.examples.data import (generate_squad, load_squad_json, prepare_eval_features,
                                   prepare_train_features, split_by_article)
from geta_hf.hf.resume import last_complete_checkpoint
from geta_hf.examples.tasks import (QuestionAnsweringMixin, QuestionAnsweringTrainer, example_batch,
                                    latency)

logger = logging.getLogger("run_qa")


class GETAQuestionAnsweringTrainer(QuestionAnsweringMixin, GETATrainer):
    """GETA training with SQuAD EM/F1 in the Trainer's evaluation."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={
        "help": "Model path or Hub id (a QA head is added if missing); for --do_eval/--do_predict "
                "without --do_train also a saved GETA-compressed checkpoint."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "A Hub dataset in SQuAD format, e.g. 'squad' or 'squad_v2' (needs network)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's config."})
    train_file: Optional[str] = field(default=None, metadata={"help": "SQuAD v1.1/v2 JSON for training."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "SQuAD v1.1/v2 JSON for evaluation."})
    test_file: Optional[str] = field(default=None, metadata={
        "help": "SQuAD v1.1/v2 JSON for --do_predict (default: the dataset's test split, else the "
                "evaluation data)."})
    split_by_article: Optional[float] = field(default=None, metadata={
        "help": "Without --validation_file: hold out this fraction of the train file's articles."})
    synthetic: bool = field(default=False, metadata={
        "help": "Use the built-in offline SQuAD-format generator (no files needed)."})
    synthetic_train: int = field(default=2000, metadata={"help": "Generated training questions."})
    synthetic_eval: int = field(default=500, metadata={"help": "Generated evaluation questions."})
    version_2_with_negative: bool = field(default=False, metadata={
        "help": "SQuAD v2: keep unanswerable questions, predict 'no answer', score HasAns/NoAns."})
    null_score_diff_threshold: float = field(default=0.0, metadata={
        "help": "SQuAD v2: answer '' when null score - best span score > this threshold."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per feature (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Overlap between windows of a long context."})
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates in post-processing."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer in tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the evaluation examples."})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the prediction examples."})
    compressed_dir: Optional[str] = field(default=None, metadata={
        "help": "Where the compressed model goes (default: <output_dir>/compressed)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Train from scratch even if --output_dir holds files or checkpoints (nothing is "
                "deleted; files the run writes replace their namesakes)."})


# ----------------------------------------------------------------------------- data
def _truncate(ds, n: Optional[int]):
    return ds.select(range(min(n, len(ds)))) if ds is not None and n else ds


def load_examples(data: DataArguments, targs) -> dict:
    """SQuAD example Datasets: {"train", "validation", "test"} (None where not needed)."""
    answerable_only = not data.version_2_with_negative
    load = lambda path: load_squad_json(path, answerable_only=answerable_only)  # noqa: E731
    train = evald = test = None
    if data.synthetic:
        t, e = generate_squad(data.synthetic_train, data.synthetic_eval, seed=targs.seed)
        train, evald = load(t), load(e)
    elif data.dataset_name:
        import datasets

        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
        train, evald, test = raw.get("train"), raw.get("validation"), raw.get("test")
    else:
        if data.train_file and (targs.do_train or data.validation_file is None):
            train = load(data.train_file)
        if data.validation_file:
            evald = load(data.validation_file)
        elif train is not None and (targs.do_eval or targs.do_predict) and data.split_by_article is not None:
            train, evald = split_by_article(train, eval_fraction=data.split_by_article, seed=targs.seed)
    if data.test_file:
        test = load(data.test_file)
    if targs.do_predict and test is None:
        logger.info("--do_predict without --test_file: predicting on the evaluation data")
        test = evald
    for flag, needed, got in (("--do_train", targs.do_train, train), ("--do_eval", targs.do_eval, evald),
                              ("--do_predict", targs.do_predict, test)):
        if needed and got is None:
            raise ValueError(f"run_qa: no data for {flag}: give --dataset_name, --synthetic, or "
                             "--train_file with --validation_file or --split_by_article FRACTION "
                             "(--test_file for --do_predict)")
    if not data.version_2_with_negative:
        for name, ds in (("evaluation", evald if targs.do_eval else None),
                         ("test", test if targs.do_predict else None)):
            if ds is not None and "answers" in ds.column_names and \
                    any(not a["text"] for a in ds["answers"]):
                raise ValueError(f"run_qa: the {name} data has unanswerable questions (SQuAD v2); "
                                 "pass --version_2_with_negative")
    return {"train": _truncate(train, data.max_train_samples) if targs.do_train else None,
            "validation": _truncate(evald, data.max_eval_samples) if targs.do_eval else None,
            "test": _truncate(test, data.max_predict_samples) if targs.do_predict else None}


def tokenize(examples, fn, tokenizer, data: DataArguments, max_len: int, targs, desc: str):
    if examples is None:
        return None
    with targs.main_process_first(desc=desc):
        return examples.map(fn, batched=True, remove_columns=examples.column_names, desc=desc,
                            fn_kwargs={"tokenizer": tokenizer, "max_length": max_len,
                                       "doc_stride": data.doc_stride})


# ----------------------------------------------------------------------------- checkpoints
def detect_last_checkpoint(targs, overwrite: bool) -> Optional[str]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` to resume from (--do_train only).

    A non-empty ``output_dir`` without one is refused (as transformers' example does), unless
    ``--overwrite_output_dir``; nothing in it is deleted either way.
    """
    out = targs.output_dir
    if not targs.do_train or overwrite or not os.path.isdir(out):
        return None
    last = last_complete_checkpoint(out)
    if last is None and os.listdir(out):
        raise ValueError(f"Output directory ({out}) already exists and is not empty (it holds "
                         f"{sorted(os.listdir(out))[:5]}) and has no checkpoint to resume from. Use "
                         "a new --output_dir, or --overwrite_output_dir to train from scratch into "
                         "it (nothing is deleted).")
    if last is not None and targs.resume_from_checkpoint is None:
        logger.info("Checkpoint detected, resuming training at %s. To avoid this, change "
                    "--output_dir or add --overwrite_output_dir to train from scratch.", last)
    return last


def _is_compressed(model) -> bool:
    return CompressedArch.of(model) is not None


def _card_results(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k in ("eval_exact_match", "eval_f1")}


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def write_predictions(result, output_dir: str) -> list:
    """``predictions.json``, ``nbest_predictions.json`` (and ``null_odds.json`` for v2)."""
    os.makedirs(output_dir, exist_ok=True)
    files = {"predictions.json": result.predictions, "nbest_predictions.json": result.nbest}
    if result.null_odds is not None:
        files["null_odds.json"] = result.null_odds
    for name, obj in files.items():
        _write_json(os.path.join(output_dir, name), obj)
    return [os.path.join(output_dir, n) for n in files]


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, GETATrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        margs, data, targs = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        margs, data, targs = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if targs.should_log else logging.WARNING)
    if not (targs.do_train or targs.do_eval or targs.do_predict):
        raise ValueError("run_qa: nothing to do; pass --do_train, --do_eval and/or --do_predict")
    if targs.push_to_hub and not targs.do_train:
        raise ValueError("run_qa: --push_to_hub uploads the compressed model this run trains, so it "
                         "needs --do_train; to upload a saved compressed checkpoint: `import geta_hf`, "
                         "load it with from_pretrained and call model.push_to_hub(repo_id)")
    last_checkpoint = detect_last_checkpoint(targs, data.overwrite_output_dir)
    transformers.set_seed(targs.seed)

    ex = load_examples(data, targs)
    logger.info("examples: %s", {k: len(v) for k, v in ex.items() if v is not None})
    tokenizer = AutoTokenizer.from_pretrained(margs.tokenizer_name or margs.model_name_or_path)
    model = AutoModelForQuestionAnswering.from_pretrained(margs.model_name_or_path)
    if targs.do_train and _is_compressed(model):
        raise ValueError(f"run_qa: {margs.model_name_or_path} is an already compressed GETA "
                         "checkpoint; --do_train needs the dense base model (use --do_eval / "
                         "--do_predict alone to evaluate it)")
    max_len = data.max_seq_length
    if max_len > tokenizer.model_max_length:
        logger.warning("--max_seq_length %d is longer than the model's %d; using %d", max_len,
                       tokenizer.model_max_length, tokenizer.model_max_length)
        max_len = tokenizer.model_max_length
    feats = {"train": tokenize(ex["train"], prepare_train_features, tokenizer, data, max_len, targs, "tokenizing train"),
             "validation": tokenize(ex["validation"], prepare_eval_features, tokenizer, data, max_len, targs, "tokenizing eval"),
             "test": tokenize(ex["test"], prepare_eval_features, tokenizer, data, max_len, targs, "tokenizing test")}

    qa_kw = dict(eval_examples=ex["validation"], version_2_with_negative=data.version_2_with_negative,
                 null_score_diff_threshold=data.null_score_diff_threshold,
                 n_best_size=data.n_best_size, max_answer_length=data.max_answer_length)
    if targs.do_train:
        trainer = GETAQuestionAnsweringTrainer(model=model, args=targs, train_dataset=feats["train"],
                                               eval_dataset=feats["validation"],
                                               processing_class=tokenizer, **qa_kw)
    else:  # evaluate / predict a dense or an already compressed model as it is
        trainer = QuestionAnsweringTrainer(model=model, args=targs, eval_dataset=feats["validation"],
                                           processing_class=tokenizer, **qa_kw)
    result: dict = {"resumed_from": None}

    if targs.do_train:
        checkpoint = targs.resume_from_checkpoint or last_checkpoint
        result["resumed_from"] = checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics, train_samples=len(feats["train"]))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        result["train"] = metrics

    if targs.do_eval:
        metrics = dict(trainer.evaluate(), eval_samples=len(feats["validation"]))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        result["eval"] = metrics

    if targs.do_train:
        trainer.save_state()  # trainer_state.json with the whole log history, eval_f1 included
        out_dir = data.compressed_dir or os.path.join(targs.output_dir, "compressed")
        card = _card_results(result.get("eval", {}))
        trainer.save_compressed(out_dir, eval_results=card or None)
        result["compressed_dir"] = out_dir
        result.update(check_compressed(trainer, out_dir, feats, tokenizer, targs, qa_kw))

    if targs.do_predict:
        out = trainer.predict(feats["test"], test_examples=ex["test"], metric_key_prefix="predict")
        if trainer.is_world_process_zero():
            result["prediction_files"] = write_predictions(out.predictions, targs.output_dir)
        metrics = dict(out.metrics, predict_samples=len(feats["test"]))
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        result["predict"] = metrics

    if targs.do_train and targs.push_to_hub:
        trainer.push_to_hub(eval_results=_card_results(result.get("eval", {})) or None,
                            dataset=data.dataset_name)
    return result


def check_compressed(trainer, out_dir: str, feats: dict, tokenizer, targs, qa_kw) -> dict:
    """Reload the compressed model as users will; evaluate it (``eval_compressed_*``) and, on
    rank 0, write its size/BOPs/latency to ``<output_dir>/qa_results.json``."""
    small = AutoModelForQuestionAnswering.from_pretrained(out_dir)
    out: dict = {}
    if targs.do_eval:
        quiet = dataclasses.replace(targs, report_to="none", push_to_hub=False)
        checker = QuestionAnsweringTrainer(model=small, args=quiet, eval_dataset=feats["validation"],
                                           processing_class=tokenizer, **qa_kw)
        out["eval_compressed"] = checker.evaluate(metric_key_prefix="eval_compressed")
        trainer.log_metrics("eval_compressed", out["eval_compressed"])
        trainer.save_metrics("eval_compressed", out["eval_compressed"])
    if trainer.is_world_process_zero():
        source = feats["validation"] if feats["validation"] is not None else feats["train"]
        batch = example_batch(source, 8)
        stats = geta_hf.model_stats(small.cpu(), batch)
        out["stats"] = {
            "params": stats["params"], "relative_params": stats["relative"]["params"],
            "relative_bops": stats["relative"]["bops"], "avg_weight_bits": stats["avg_weight_bits"],
            "size_on_disk_bytes": os.path.getsize(os.path.join(out_dir, "model.safetensors")),
            "latency_s_batch8": latency(small, batch), "geta": trainer.geta_metrics()}
        logger.info("compressed model: relative BOPs %.4f, params %.3fx, %d bytes on disk",
                    out["stats"]["relative_bops"], out["stats"]["relative_params"],
                    out["stats"]["size_on_disk_bytes"])
        _write_json(os.path.join(targs.output_dir, "qa_results.json"),
                    {k: v for k, v in out.items()} | {"compressed_dir": out_dir})
    return out


if __name__ == "__main__":
    main()
