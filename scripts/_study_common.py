"""Shared machinery of the joint-vs-sequential studies (``study_qa.py``, ``study_lm.py``).

Both studies ask one question (issue #9): at a matched compute budget, does GETA's joint
pruning + mixed-precision quantization-aware training beat doing the two one after the other?
Every method gets the same number of optimizer steps ``N``, the same data, seed, batch size,
learning rate and LR schedule (``constant_with_warmup``, 10% warm-up):

* ``dense``: ``N`` steps of plain fine-tuning with ``transformers.Trainer`` (fp32 reference);
* ``geta``: ``N`` steps of :class:`geta_hf.GETATrainer` (pruning and bit widths learned together),
  then ``compress_model`` (units removed, weights bit-packed);
* ``geta_kd``: ``geta`` with logit distillation from the same seed's dense model
  (:class:`geta_hf.DistillationTrainer`, weight and temperature in ``KD``);
* ``qat``: the same with ``target_group_sparsity=0`` (quantization-aware training only);
* ``prune``: ``N`` steps of :class:`geta_hf.QASSO` on the float model (GETA's pruning schedule
  and saliency scores, no quantizers): pruning only;
* ``sequential``: the first ``N/2`` steps of the dense run, magnitude pruning of the same unit
  families (the QADG's heads / kv-groups / MLP channels) down to the same unit count, ``N/2``
  fine-tuning steps with the pruned units held at zero, then post-training quantization to the
  per-layer bit widths GETA learned at that sparsity (so BOPs match), with either max-abs or
  MSE-optimal weight clipping. Its fp32 model before quantization is also measured
  (magnitude pruning + fine-tuning, a second pruning-only baseline);
* ``sequential_kd``: ``sequential`` with the same distillation in its fine-tuning half.

A task (QA or causal LM) supplies the model, data and metric through :class:`Task`; this module
runs the methods, measures every resulting model with the library's own code
(:func:`geta_hf.model_stats`, :func:`geta_hf.examples.tasks.latency`, the saved ``model.safetensors``),
keeps one JSON file per run (so an interrupted study resumes); :mod:`_study_report` renders
the markdown and plots from those records.
"""

from __future__ import annotations

import copy
import datetime
import gc
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the real SQuAD slice shared by this machine's projects (answerable questions are used)
SQUAD_SLICE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "squad-v2-dev-slice.json"))
METHODS = ("dense", "geta", "geta_kd", "qat", "prune", "sequential", "sequential_kd")
#: the methods without distillation (the LM study's default)
BASE_METHODS = ("dense", "geta", "qat", "prune", "sequential")
#: bumped when the GETA method changes, so stored runs of an older method are not reused
METHOD_VERSION = 2
#: knowledge distillation of the ``*_kd`` arms (teacher: the same seed's dense model)
KD = {"weight": 0.5, "temperature": 2.0}
#: QASSO stage lengths (fractions of N) used by every GETA-style run; cool-down takes the rest
STAGES = {"warmup": 0.1, "projection": 0.2, "joint": 0.3, "projection_periods": 5,
          "pruning_periods": 3}
#: bits removed from the upper bound per projection period (method §3.2)
BIT_REDUCTION = 2
#: named departures from ``STAGES`` / ``KD`` for choosing hyper-parameters (``--variant``, run on
#: ``--split dev``): a variant names the runs it changes (a suffix of the setting's tag) instead of
#: entering the fingerprint, so the dense runs and unaffected arms are shared with the default
VARIANTS = {
    # stage fractions (warm-up, projection, joint; cool-down takes the rest)
    "late": {"warmup": 0.2, "projection": 0.2, "joint": 0.2},
    "kd0.8": {"kd_weight": 0.8},
    "late-kd0.8": {"warmup": 0.2, "projection": 0.2, "joint": 0.2, "kd_weight": 0.8},
    # unit saliency from the loss gradient averaged over a window before each pruning period
    # (GETAConfig.importance_source="gradient") instead of the one-step Adam displacement
    "sal-grad": {"importance_source": "gradient"},
    "sal-grad-t1": {"importance_source": "gradient",
                    "importance_weights": {"taylor_first_order": 1.0}},
    # sal-grad, with one pruning period that starts where the sequential baseline prunes
    # (step N/2; forgotten over 0.1 N, then 0.4 N of cool-down)
    "sal-grad-1p": {"importance_source": "gradient", "warmup": 0.3, "projection": 0.2,
                    "joint": 0.1, "pruning_periods": 1},
    # more, shorter pruning periods (smaller steps of units removed at once)
    "periods6": {"pruning_periods": 6},
}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line with the time since the script started."""
    print(f"[{(time.perf_counter() - _T0) / 60:6.1f} min] {msg}", flush=True)


def setup_process(threads: int = 2) -> None:
    """Offline, ``threads`` CPU threads (at most the core count), quiet transformers, glibc
    heap tuned (as the library's benches do)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    from geta_hf.utils import tune_cpu_allocator

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    tune_cpu_allocator()


def csv_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ============================================================================ settings
@dataclass(frozen=True)
class Setting:
    """A compression target: group sparsity and the *final* bit ranges (None = float)."""

    sparsity: float = 0.0
    weight_bits: Optional[Tuple[int, int]] = None
    act_bits: Optional[Tuple[int, int]] = None
    #: GETA's ``target_relative_bops`` (None: the rounded learned bits)
    bops: Optional[float] = None
    #: a key of ``VARIANTS`` ("": the study's defaults)
    variant: str = ""

    def __post_init__(self) -> None:
        if self.variant and self.variant not in VARIANTS:
            raise SystemExit(f"unknown variant {self.variant!r}; choose among {sorted(VARIANTS)}")

    @property
    def overrides(self) -> Dict[str, float]:
        """The variant's departures from ``STAGES`` / ``KD``."""
        return dict(VARIANTS.get(self.variant, {}))

    @property
    def tag(self) -> str:
        """Short id used in run names, e.g. ``s0.5-w4-8-a8-16`` or ``s0.5-w4-8-B0.2``."""
        parts = []
        if self.sparsity:
            parts.append(f"s{self.sparsity:g}")
        if self.weight_bits:
            parts.append("w{}-{}".format(*self.weight_bits))
        if self.act_bits:
            parts.append("a{}-{}".format(*self.act_bits))
        if self.bops is not None:
            parts.append(f"B{self.bops:g}")
        if self.variant:
            parts.append(f"v{self.variant}")
        return "-".join(parts) or "fp32"

    @property
    def bits_label(self) -> str:
        if not self.weight_bits:
            return "fp32"
        out = "w[{},{}]".format(*self.weight_bits)
        if self.act_bits:
            out += " a[{},{}]".format(*self.act_bits)
        if self.bops is not None:
            out += f" BOPs<={self.bops:g}"
        if self.variant:
            out += f" [variant {self.variant}]"
        return out

    def geta_config(self, **overrides):
        """The :class:`geta_hf.GETAConfig` of a GETA-style run reaching this setting.

        Weights start at ``b_u + (periods - 1) * BIT_REDUCTION`` bits (at most 16) and the upper
        bound falls by ``BIT_REDUCTION`` per projection period to ``b_u`` (the recipe of
        ``geta-hf demo``); activation ranges are used as given, under the same schedule.
        """
        from geta_hf import GETAConfig

        lo, hi = self.weight_bits or (4, 16)
        start = min(16, hi + (STAGES["projection_periods"] - 1) * BIT_REDUCTION)
        stages = {**STAGES, **{k: v for k, v in self.overrides.items() if k in STAGES}}
        kw = dict(target_group_sparsity=self.sparsity, weight_bits=(lo, start),
                  activation_bits=tuple(self.act_bits) if self.act_bits else None,
                  bit_reduction=BIT_REDUCTION, warmup=stages["warmup"],
                  projection=stages["projection"], joint=stages["joint"],
                  projection_periods=stages["projection_periods"],
                  pruning_periods=stages["pruning_periods"], target_relative_bops=self.bops,
                  # the study's default arm is the paper's saliency (the stored runs measured
                  # it); ``--variant sal-grad-1p`` is the library's default since #14
                  importance_source="update")
        for key in ("importance_weights", "importance_source"):
            if key in self.overrides:
                kw[key] = self.overrides[key]
        kw.update(overrides)
        return GETAConfig(**kw)


@dataclass(frozen=True)
class Run:
    """One unit of work: a method at a setting (``sequential`` covers several bit settings)."""

    method: str
    setting: Setting
    #: sequential only: the bit settings quantized after the one pruning + fine-tuning pass
    ptq: Tuple[Setting, ...] = ()

    @property
    def name(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method.startswith("sequential"):
            kd = "-kd" if self.method.endswith("_kd") else ""
            v = f"-v{self.setting.variant}" if self.setting.variant else ""
            return f"sequential{kd}-s{self.setting.sparsity:g}{v}"
        return f"{self.method.replace('_', '-')}-{self.setting.tag}"


def plan_runs(methods: Sequence[str], geta_settings: Sequence[Setting]) -> List[Run]:
    """The runs of a study, in dependency order (sequential needs GETA's learned bits)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose among {list(METHODS)}")
    runs: List[Run] = []
    if "dense" in methods:
        runs.append(Run("dense", Setting()))
    if "geta" in methods:
        runs += [Run("geta", s) for s in geta_settings]
    if "geta_kd" in methods:
        runs += [Run("geta_kd", s) for s in geta_settings]
    if "qat" in methods:
        keys = dict.fromkeys((s.weight_bits, s.act_bits, _arm_variant("qat", s.variant))
                             for s in geta_settings)
        runs += [Run("qat", Setting(0.0, w, a, variant=v)) for w, a, v in keys]
    if "prune" in methods:
        for s, v in dict.fromkeys((s.sparsity, _arm_variant("prune", s.variant))
                                  for s in geta_settings):
            runs.append(Run("prune", Setting(s, variant=v)))
    for method in ("sequential", "sequential_kd"):
        if method in methods:
            for s, v in dict.fromkeys((s.sparsity, _arm_variant(method, s.variant))
                                      for s in geta_settings):
                runs.append(Run(method, Setting(s, variant=v),
                                ptq=tuple(g for g in geta_settings if g.sparsity == s and
                                          _arm_variant(method, g.variant) == v)))
    return runs


def _arm_variant(method: str, variant: str) -> str:
    """The variant a derived arm takes from a GETA setting, "" when the variant does not change
    it: QAT only and pruning only follow stage and saliency changes (they are GETA's ablations),
    ``sequential_kd`` only the distillation weight, plain ``sequential`` nothing."""
    keys = set(VARIANTS.get(variant, {}))
    changes = {"qat": keys - {"kd_weight"}, "prune": keys - {"kd_weight"},
               "sequential_kd": keys & {"kd_weight"}}.get(method, set())
    return variant if changes else ""


@dataclass
class Hyper:
    """Training hyper-parameters shared by every method of a study (part of the fingerprint)."""

    steps: int
    batch_size: int
    learning_rate: float
    extra: Dict[str, Any] = field(default_factory=dict)  # task settings (lengths, data sizes)

    def fingerprint(self) -> str:
        blob = json.dumps({"hyper": asdict(self), "stages": STAGES, "bit_reduction": BIT_REDUCTION,
                           "method_version": METHOD_VERSION, "kd": KD}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


# ============================================================================ the task interface
class Task:
    """What a study plugs in: model, data, example inputs and the quality metric.

    Subclasses set ``study`` (``"qa"``/``"lm"``), ``dataset``, ``metrics`` (column names, the
    primary one first), ``higher_is_better`` and implement the methods below.
    """

    study: str = ""
    dataset: str = ""
    metrics: Tuple[str, ...] = ()
    higher_is_better: bool = True
    processing_class = None
    train_dataset = None
    #: the Trainer's collator (None: the Trainer's default for ``processing_class``)
    data_collator = None
    #: data sizes and choices worth reporting (stored with every run)
    sizes: Dict[str, Any] = {}

    def fresh_model(self, seed: int) -> nn.Module:
        """The pretrained starting point (task head initialised with ``seed``)."""
        raise NotImplementedError

    def example_inputs(self) -> Dict[str, torch.Tensor]:
        """Two rows of training inputs: the batch the QADG is captured with."""
        raise NotImplementedError

    def calibration_batches(self) -> List[Dict[str, torch.Tensor]]:
        """Training batches for activation ranges (post-training quantization)."""
        raise NotImplementedError

    def stats_batch(self) -> Dict[str, torch.Tensor]:
        """The evaluation batch used for BOPs/parameters and CPU latency."""
        raise NotImplementedError

    def score(self, model: nn.Module) -> Dict[str, float]:
        """The quality metrics of ``model`` on the held-out data."""
        raise NotImplementedError


# ============================================================================ training helpers
def training_args(cls, out_dir: str, hp: Hyper, steps: int, seed: int, **extra):
    """`TrainingArguments` (or `GETATrainingArguments`) shared by every run of a study."""
    return cls(output_dir=out_dir, per_device_train_batch_size=hp.batch_size, max_steps=steps,
               learning_rate=hp.learning_rate, lr_scheduler_type="constant_with_warmup",
               warmup_steps=max(1, steps // 10), weight_decay=0.0, report_to="none",
               save_strategy="no", logging_steps=max(1, steps // 5), use_cpu=True, seed=seed,
               disable_tqdm=True, **extra)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class AtStep(_callback_base()):
    """Calls ``fn()`` after optimizer step ``step``; optionally stops training there."""

    def __init__(self, step: int, fn: Callable[[], None], stop: bool = False) -> None:
        self.step, self.fn, self.stop = step, fn, stop

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.fn()
            if self.stop:
                control.should_training_stop = True
        return control


class KeepUnitsZero(_callback_base()):
    """Re-zeroes pruned units after every optimizer step (masked fine-tuning)."""

    def __init__(self, qadg, model: nn.Module, unit_ids: Sequence[int]) -> None:
        self.qadg, self.model, self.ids = qadg, model, list(unit_ids)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.qadg.zero_units(self.model, self.ids)
        return control


def train(model: nn.Module, task: Task, args, *, trainer_cls=None, callbacks=(), **kwargs):
    """Build a Trainer over the task's training data, train, return (trainer, seconds)."""
    import transformers

    cls = trainer_cls or transformers.Trainer
    if task.data_collator is not None:
        kwargs.setdefault("data_collator", task.data_collator)
    trainer = cls(model=model, args=args, train_dataset=task.train_dataset,
                  processing_class=task.processing_class, callbacks=list(callbacks), **kwargs)
    # the task heads return a mean loss and ignore num_items_in_batch (HF-NOTES, loss scaling)
    trainer.model_accepts_loss_kwargs = False
    t0 = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - t0


def magnitude_units(model: nn.Module, qadg, k: int) -> List[int]:
    """The ``k`` units of smallest RMS weight magnitude, every family keeping ``min_units``.

    The score is the unit's group norm divided by the square root of its parameter count, so
    that heads (tens of thousands of weights) and MLP channels (hundreds) are comparable. The
    selection itself is QASSO's (:func:`geta_hf.optim.importance.select_units`, with the same
    per-family floors); only the score differs from GETA's saliency.
    """
    from geta_hf.optim.importance import kept_floor, select_units

    fams = qadg.families
    sizes = torch.tensor([f.num_units for f in fams], dtype=torch.long)
    per_unit = torch.repeat_interleave(
        torch.tensor([float(f.group_params_per_unit) for f in fams]), sizes)
    scores = qadg.unit_norms(model).cpu() / per_unit.sqrt()
    family_of_unit = torch.repeat_interleave(torch.arange(len(fams)), sizes)
    floors = [kept_floor(f.num_units, f.min_units, 1) for f in fams]
    return select_units(scores, torch.ones(qadg.num_units, dtype=torch.bool), family_of_unit,
                        [f.num_units for f in fams], [f.num_units for f in fams], floors, 1, k)


@torch.no_grad()
def post_training_quantize(model: nn.Module, setting: Setting, bits: Mapping[str, Mapping[str, int]],
                           calibration: Iterable, clip: str) -> Dict[str, Dict[str, int]]:
    """Quantize ``model`` (in place) to per-layer ``bits`` without training.

    Inserts the library's quantizers (:func:`geta_hf.prepare_model`, linear quantizer), sets
    each weight quantizer's clip (``max``: ``max|W|``; ``mse``: :func:`mse_clip`) and its step
    ``d`` for the layer's bit width (``init_range`` uses :func:`geta_hf.quant.d_for_bits`), and,
    with activation bits, calibrates input ranges on ``calibration`` batches
    (:func:`geta_hf.calibrate_activations`, max of ``|x|``) before setting their bit widths.
    Layers missing from ``bits`` get the setting's upper bound. Returns the bits used.
    """
    import geta_hf
    from geta_hf.quant import quant_layers
    from geta_hf.quant.calibrate import mse_clip

    cfg = setting.geta_config(quantizer="linear", weight_bits=tuple(setting.weight_bits),
                              bit_reduction=0)
    geta_hf.prepare_model(model, cfg)
    if setting.act_bits:
        geta_hf.calibrate_activations(model, calibration, cfg)
    used = {}
    for name, layer in quant_layers(model):
        want = bits.get(name, {})
        wb = int(want.get("weight") or setting.weight_bits[1])
        w = layer.weight.detach()
        layer.weight_quantizer.init_range(mse_clip(w, wb) if clip == "mse" else w.abs().max(), wb)
        used[name] = {"weight": wb}
        if setting.act_bits and layer.act_quantizer is not None:
            ab = int(want.get("act") or setting.act_bits[1])
            if ab >= 32:
                ab = setting.act_bits[1]
            layer.act_quantizer.set_bits(ab)
            used[name]["act"] = ab
    return used


def layer_bits_of(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """``{layer: {"weight": bits, "act": bits}}`` of every quantized (or packed) layer."""
    from geta_hf.compress import PackedQuantLinear, layer_bits
    from geta_hf.quant import QuantLayerMixin

    return {n: layer_bits(m) for n, m in model.named_modules()
            if isinstance(m, (PackedQuantLinear, QuantLayerMixin))}


def load_snapshot(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_model

    load_model(model, path)


def save_snapshot(model: nn.Module, path: str) -> None:
    from safetensors.torch import save_model

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_model(model, tmp)
    os.replace(tmp, path)


# ============================================================================ measurement
def _removed_fraction(model: nn.Module) -> float:
    from geta_hf.compress import CompressedArch

    arch = CompressedArch.of(model)
    fams = arch.families if arch is not None else {}
    total = sum(f["units"] for f in fams.values())
    return sum(f["units"] - len(f["kept"]) for f in fams.values()) / total if total else 0.0


def measure(task: Task, model: nn.Module, save: Callable[[str], Any], work_dir: str) -> Dict[str, Any]:
    """Every number of a result row, measured on ``model`` with the library's code.

    ``save(dir)`` writes the checkpoint whose ``*.safetensors`` size is reported (removed after).
    """
    import geta_hf
    from geta_hf.examples.tasks import latency

    model.eval()
    os.makedirs(work_dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="ckpt-", dir=work_dir)
    try:
        save(folder)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                   if f.endswith(".safetensors"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    scores = task.score(model)
    batch = task.stats_batch()
    stats = geta_hf.model_stats(model, batch)
    linear = [r for r in stats["layers"] if r["kind"] == "linear"]
    act = [r["act_bits"] for r in linear if r["act_bits"] < 32]
    return {
        "metrics": scores,
        "relative_bops": stats["relative"]["bops"],
        "relative_macs": stats["relative"]["macs"],
        "relative_params": stats["relative"]["params"],
        "params": stats["params"],
        "size_bytes": size,
        "latency_ms": 1000.0 * latency(model, batch),
        "avg_linear_weight_bits": stats["avg_layer_weight_bits"],
        "avg_act_bits": sum(act) / len(act) if act else 32.0,
        "removed_units": _removed_fraction(model),
    }


def _row(run: Run, key: str, label: str, setting: Setting, measured: Dict[str, Any],
         note: str = "") -> Dict[str, Any]:
    return {"key": key, "method": run.method, "label": label, "sparsity": setting.sparsity,
            "weight_bits": list(setting.weight_bits) if setting.weight_bits else None,
            "act_bits": list(setting.act_bits) if setting.act_bits else None,
            "bops_target": setting.bops,
            **({"variant": setting.variant} if setting.variant else {}),
            "note": note, **measured}


# ============================================================================ the methods
class Runner:
    """Runs the methods of one study on one task and seed, one JSON per run."""

    def __init__(self, task: Task, hp: Hyper, seed: int, store: "RunStore", work_dir: str) -> None:
        self.task, self.hp, self.seed, self.store = task, hp, seed, store
        self.work = os.path.join(work_dir, task.study, hp.fingerprint(), task.dataset, f"seed{seed}")
        os.makedirs(self.work, exist_ok=True)

    # ------------------------------------------------------------------ plumbing
    def _out(self, name: str) -> str:
        return os.path.join(self.work, name)

    @property
    def half_path(self) -> str:
        return self._out("dense-half.safetensors")

    @property
    def final_path(self) -> str:
        return self._out("dense-final.safetensors")

    def _teacher(self, setting: Setting) -> Dict[str, Any]:
        """Trainer keyword arguments of distillation from this seed's dense model."""
        if not os.path.exists(self.final_path):
            self.run(Run("dense", Setting()), rerun=True)
        teacher = self.task.fresh_model(self.seed)
        load_snapshot(teacher, self.final_path)
        weight = setting.overrides.get("kd_weight", KD["weight"])
        return {"teacher_model": teacher, "distillation_weight": weight,
                "distillation_temperature": KD["temperature"]}

    def run(self, run: Run, rerun: bool = False) -> Dict[str, Any]:
        """Run (or reuse the stored result of) one run; returns its record."""
        rec = None if rerun else self.store.load(self.task, self.seed, run.name)
        if rec is not None:
            log(f"{self.task.dataset} seed {self.seed}: {run.name}: stored result reused")
            return self.top_up(run, rec)
        log(f"{self.task.dataset} seed {self.seed}: {run.name} ({self.hp.steps} steps) ...")
        t0 = time.perf_counter()
        rows, extra = getattr(self, f"_{run.method}")(run)
        rec = {"study": self.task.study, "dataset": self.task.dataset, "seed": self.seed,
               "run": run.name, "method": run.method, "rows": rows,
               "seconds": time.perf_counter() - t0, "data": dict(self.task.sizes), **extra}
        if run.setting.variant:
            rec["variant"] = {"name": run.setting.variant, **run.setting.overrides}
        self.store.save(self.task, self.hp, rec)
        for r in rows:
            log(f"  {r['label']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items())
                + f", rel. BOPs {r['relative_bops']:.4f}, {r['size_bytes'] / 2**20:.1f} MiB, "
                  f"{r['latency_ms']:.0f} ms")
        log(f"  done in {rec['seconds']:.0f} s")
        gc.collect()
        return rec

    # ------------------------------------------------------------------ dense
    def _dense(self, run: Run):
        import transformers

        model = self.task.fresh_model(self.seed)
        snap = AtStep(self.hp.steps // 2, lambda: save_snapshot(model, self.half_path))
        args = training_args(transformers.TrainingArguments, self._out("dense"), self.hp,
                             self.hp.steps, self.seed)
        _, secs = train(model, self.task, args, callbacks=[snap])
        save_snapshot(model, self.final_path)  # the teacher of the *_kd arms
        m = measure(self.task, model, model.save_pretrained, self.work)
        return [_row(run, "dense", "dense fine-tuning (fp32)", run.setting, m)], {"train_seconds": secs}

    def _dense_half(self) -> nn.Module:
        """The dense run's model after ``N // 2`` steps (cached; recomputed identically if absent)."""
        import transformers

        model = self.task.fresh_model(self.seed)
        if os.path.exists(self.half_path):
            load_snapshot(model, self.half_path)
            return model
        log("  first half of the dense run (not cached yet)")
        stop = AtStep(self.hp.steps // 2, lambda: save_snapshot(model, self.half_path), stop=True)
        args = training_args(transformers.TrainingArguments, self._out("dense-half"), self.hp,
                             self.hp.steps, self.seed)
        train(model, self.task, args, callbacks=[stop])
        return model

    # ------------------------------------------------------------------ GETA and QAT only
    def _geta(self, run: Run):
        import geta_hf

        cfg = run.setting.geta_config()
        args = training_args(geta_hf.GETATrainingArguments, self._out(run.name), self.hp,
                             self.hp.steps, self.seed)
        kd = self._teacher(run.setting) if run.method.endswith("_kd") else {}
        model = self.task.fresh_model(self.seed)
        trainer, secs = train(model, self.task, args, trainer_cls=geta_hf.GETATrainer,
                              geta_config=cfg, example_inputs=self.task.example_inputs(), **kd)
        describe = trainer.geta_optimizer.describe()
        small = trainer.compressed_model()
        m = measure(self.task, small, lambda d: geta_hf.save_compressed(small, d), self.work)
        label = {"geta": "GETA joint", "geta_kd": "GETA joint + KD"}.get(
            run.method, "QAT only (GETA, sparsity 0)")
        extra = {"train_seconds": secs, "layer_bits": layer_bits_of(small),
                 "geta_config": cfg.to_dict(),
                 "optimizer": {k: describe[k] for k in ("target_units", "achieved_units",
                                                         "zero_units", "num_groups",
                                                         "group_sparsity", "avg_weight_bits",
                                                         "avg_act_bits",
                                                         "forget_budget_bound_steps")}}
        return [_row(run, run.name, label, run.setting, m)], extra

    _qat = _geta_kd = _geta

    # ------------------------------------------------------------------ pruning only
    def _prune(self, run: Run):
        import transformers

        import geta_hf

        cfg = run.setting.geta_config()
        model = self.task.fresh_model(self.seed)
        qadg = geta_hf.build_qadg(model, self.task.example_inputs(), cfg)
        opt = geta_hf.QASSO(model, qadg, cfg, lr=self.hp.learning_rate, variant="adamw",
                            total_steps=self.hp.steps, weight_decay=0.0)
        args = training_args(transformers.TrainingArguments, self._out(run.name), self.hp,
                             self.hp.steps, self.seed)
        _, secs = train(model, self.task, args, optimizers=(opt, None))
        describe = opt.describe()
        m = self._measure_compressed(model, qadg)
        extra = {"train_seconds": secs, "optimizer": {k: describe[k] for k in (
            "target_units", "achieved_units", "zero_units", "num_groups", "group_sparsity")}}
        return [_row(run, run.name, "pruning only (QASSO, fp32)", run.setting, m)], extra

    # ------------------------------------------------------------------ sequential
    def _sequential(self, run: Run):
        import transformers

        import geta_hf
        from geta_hf.optim.schedule import target_units

        s = run.setting.sparsity
        model = self._dense_half()
        qadg = geta_hf.build_qadg(model, self.task.example_inputs())
        k = target_units(s, qadg.num_units)
        units = magnitude_units(model, qadg, k)
        qadg.zero_units(model, units)
        steps = self.hp.steps - self.hp.steps // 2
        # a different data order than the first half, which the dense run already consumed
        args = training_args(transformers.TrainingArguments, self._out(run.name), self.hp, steps,
                             self.seed, data_seed=self.seed + 1)
        kd = run.method.endswith("_kd")
        extra_kw = (dict(trainer_cls=geta_hf.DistillationTrainer, **self._teacher(run.setting))
                    if kd else {})
        _, secs = train(model, self.task, args, callbacks=[KeepUnitsZero(qadg, model, units)],
                        **extra_kw)
        save_snapshot(model, self._out(f"{run.name}-ft.safetensors"))  # for later PTQ targets
        tag = "-kd" if kd else ""
        m = self._measure_compressed(copy.deepcopy(model), qadg)
        v = f"-v{run.setting.variant}" if run.setting.variant else ""
        rows = [_row(run, f"magprune{tag}-s{s:g}{v}", "magnitude pruning + fine-tuning (fp32)"
                     + (" + KD" if kd else ""), run.setting, m,
                     note="sequential before quantization")]
        ptq_rows, used_bits = self._ptq_rows(run, model, qadg, run.ptq)
        extra = {"train_seconds": secs, "pruned_units": len(units), "target_units": k,
                 "num_groups": qadg.num_units, "ptq_bits": used_bits}
        return rows + ptq_rows, extra

    def _ptq_rows(self, run: Run, model: nn.Module, qadg, targets: Sequence[Setting]):
        """Post-training quantization rows of a sequential run's fine-tuned model, per target
        setting (GETA's learned bits at that setting) and clip."""
        kd = run.method.endswith("_kd")
        tag = "-kd" if kd else ""
        calib = self.task.calibration_batches()
        rows, used_bits = [], {}
        for target in targets:
            source, bits = self._geta_bits(target, prefer_kd=kd)
            for clip in ("max", "mse"):
                q = copy.deepcopy(model)
                key = f"seq{tag}-{target.tag}-{clip}"
                used_bits[key] = post_training_quantize(q, target, bits, calib, clip)
                m = self._measure_compressed(q, qadg)
                rows.append(_row(run, key, f"sequential{' + KD' if kd else ''}, PTQ {clip} clip",
                                 target, m, note=f"bits: {source}"))
        return rows, used_bits

    def top_up(self, run: Run, rec: Dict[str, Any]) -> Dict[str, Any]:
        """A stored sequential run lacking the PTQ rows of newly added settings gets them from
        its saved fine-tuned model (no retraining); other records are returned as they are."""
        import geta_hf

        keys = {r["key"] for r in rec["rows"]}
        tag = "-kd" if run.method.endswith("_kd") else ""
        missing = [t for t in run.ptq if f"seq{tag}-{t.tag}-mse" not in keys]
        snap = self._out(f"{run.name}-ft.safetensors")
        if not run.method.startswith("sequential") or not missing or not os.path.exists(snap):
            return rec
        log(f"  adding PTQ rows for {[t.tag for t in missing]} from {os.path.basename(snap)}")
        model = self.task.fresh_model(self.seed)
        load_snapshot(model, snap)
        qadg = geta_hf.build_qadg(model, self.task.example_inputs())
        rows, used = self._ptq_rows(run, model, qadg, missing)
        rec = {**rec, "rows": rec["rows"] + rows, "ptq_bits": {**rec.get("ptq_bits", {}), **used}}
        self.store.save(self.task, self.hp, rec)
        return rec

    _sequential_kd = _sequential

    def _measure_compressed(self, model: nn.Module, qadg) -> Dict[str, Any]:
        """Remove the zeroed units (and pack quantized weights) of ``model``, then measure it.

        A quantized model is saved with :func:`geta_hf.save_compressed`. A float (pruning-only)
        model has no ``geta`` quantization config to write, so it is compressed with the core
        :func:`geta_hf.compress.compress_model` and its size is that of ``save_pretrained``.
        """
        import geta_hf
        from geta_hf.compress import compress_model as core_compress
        from geta_hf.quant import quant_layers

        example = self.task.example_inputs()
        if quant_layers(model):
            geta_hf.compress_model(model, qadg, example_inputs=example)
            save = lambda d: geta_hf.save_compressed(model, d)  # noqa: E731
        else:
            core_compress(model, qadg, example_inputs=example)
            save = model.save_pretrained
        return measure(self.task, model, save, self.work)

    def _geta_bits(self, target: Setting, prefer_kd: bool = False
                   ) -> Tuple[str, Dict[str, Dict[str, int]]]:
        """GETA's learned per-layer bits at ``target`` (same dataset and seed; the KD run's
        first when ``prefer_kd``), else uniform."""
        methods = ("geta_kd", "geta") if prefer_kd else ("geta", "geta_kd")
        for method in methods:
            name = Run(method, target).name
            rec = self.store.load(self.task, self.seed, name)
            if rec is not None and rec.get("layer_bits"):
                return f"GETA's per-layer bits ({name})", rec["layer_bits"]
        hi_w = target.weight_bits[1]
        desc = f"uniform {hi_w}-bit weights"
        if target.act_bits:
            desc += f", {target.act_bits[1]}-bit inputs"
        return desc + " (no GETA run to copy bits from)", {}


def run_seeds(task: Task, hp: Hyper, seeds: Sequence[int], store: "RunStore", work_dir: str,
              runs: Sequence[Run], rerun: bool, after_seed: Callable[[], Any]) -> None:
    """Every planned run of ``task`` for each seed (stored results are reused unless ``rerun``);
    ``after_seed()`` is called after each seed (the scripts re-render their page there)."""
    for seed in seeds:
        runner = Runner(task, hp, seed, store, work_dir)
        for run in runs:
            runner.run(run, rerun=rerun)
        after_seed()


# ============================================================================ result store
class RunStore:
    """One JSON file per (study, dataset, seed, run), tagged with the hyper-parameter fingerprint."""

    def __init__(self, out_dir: str, hp: Hyper, command: str) -> None:
        self.root = os.path.join(out_dir, "study-runs")
        self.hp, self.command = hp, command

    def _path(self, study: str, dataset: str, seed: int, name: str) -> str:
        return os.path.join(self.root, study, dataset, f"{name}-seed{seed}.json")

    def load(self, task: Task, seed: int, name: str) -> Optional[Dict[str, Any]]:
        path = self._path(task.study, task.dataset, seed, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            rec = json.load(f)
        return rec if rec.get("fingerprint") == self.hp.fingerprint() else None

    def save(self, task: Task, hp: Hyper, rec: Dict[str, Any]) -> str:
        rec = {**rec, "fingerprint": hp.fingerprint(), "hyper": asdict(hp), "stages": STAGES,
               "bit_reduction": BIT_REDUCTION, "command": self.command,
               "finished": datetime.datetime.now().isoformat(timespec="seconds"),
               "environment": environment()}
        path = self._path(task.study, task.dataset, rec["seed"], rec["run"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1, default=float)
        os.replace(path + ".tmp", path)
        return path

    def records(self, study: str) -> List[Dict[str, Any]]:
        """Every stored record of ``study`` with the current fingerprint."""
        out = []
        base = os.path.join(self.root, study)
        for dirpath, _, files in os.walk(base):
            for fn in sorted(files):
                if fn.endswith(".json"):
                    with open(os.path.join(dirpath, fn)) as f:
                        rec = json.load(f)
                    if rec.get("fingerprint") == self.hp.fingerprint():
                        out.append(rec)
        return out


def environment() -> Dict[str, Any]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def command_line(argv: Optional[Sequence[str]], script: str) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"scripts/{script}"] + [shlex.quote(a) for a in args])
