"""`GETATrainingArguments`: `TrainingArguments` plus every GETA knob, exposed to `HfArgumentParser`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

from transformers import TrainingArguments

from ..config import IMPORTANCE_CRITERIA, GETAConfig
from .distill import check_distillation_temperature, check_distillation_weight

__all__ = ["GETATrainingArguments"]


def _stage(value: float, name: str):
    """A float <= 1 is a fraction of the run; a whole number > 1 is an absolute step count."""
    if not math.isfinite(value):
        raise ValueError(f"GETATrainingArguments: --{name}={value!r} is invalid; allowed: a "
                         "fraction in [0, 1] or a whole number of steps > 1")
    if value > 1:
        if value != int(value):
            raise ValueError(f"GETATrainingArguments.{name}: got {value!r}; allowed: a fraction in "
                             "[0, 1] or a whole number of steps > 1")
        return int(value)
    return float(value)


def _weights(spec: Optional[str]) -> dict:
    if spec is None:
        return {k: 0.2 for k in IMPORTANCE_CRITERIA}
    out = {}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError("GETATrainingArguments.geta_importance_weights: expected "
                             f"'name=weight,...' with names among {list(IMPORTANCE_CRITERIA)}; got {spec!r}")
        key = key.strip()
        if key in out:
            raise ValueError(f"GETATrainingArguments.geta_importance_weights: {key!r} is given "
                             f"twice in {spec!r}; allowed: each criterion once")
        try:
            out[key] = float(val)
        except ValueError as e:
            raise ValueError(f"GETATrainingArguments.geta_importance_weights: {val!r} is not a number") from e
    return out


@dataclass
class GETATrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with GETA's settings (all prefixed ``geta_``).

    Every field appears on the command line through `HfArgumentParser`
    (e.g. ``--geta_target_group_sparsity 0.4 --geta_weight_bits 4 8``). They are turned into a
    :class:`geta_hf.GETAConfig` by :meth:`to_geta_config`, which validates them.
    """

    geta_target_group_sparsity: float = field(default=0.5, metadata={
        "help": "Fraction of prunable units (attention heads, GQA kv-groups, MLP channels) to remove, in [0, 1)."})
    geta_weight_bits: List[int] = field(default_factory=lambda: [4, 16], metadata={
        "help": "Weight bit range: two integers b_l b_u with 2 <= b_l <= b_u <= 16 (layers start at b_u)."})
    geta_activation_bits: Optional[List[int]] = field(default=None, metadata={
        "help": "Input (activation) bit range b_l b_u; omit for weight-only quantization."})
    geta_bit_reduction: int = field(default=2, metadata={
        "help": "Bits removed from the upper bound at each projection period (never below b_l)."})
    geta_quantizer: str = field(default="linear", metadata={
        "help": "Quantizer kind: 'linear' (default) or 'nonlinear' (the paper's learned exponent t).",
        "choices": ["nonlinear", "linear"]})
    geta_warmup: float = field(default=0.1, metadata={
        "help": "Warm-up length: a fraction of the training steps (<= 1) or a number of steps (> 1)."})
    geta_projection: float = field(default=0.2, metadata={
        "help": "Projection-stage length (bit-range projection, upper bound shrinking): fraction or steps."})
    geta_joint: float = field(default=0.4, metadata={
        "help": "Joint-stage length (pruning periods with forget rate and quant step): fraction or steps. "
                "Cool-down (frozen integer bits) takes the rest."})
    geta_projection_periods: int = field(default=5, metadata={
        "help": "Number of max-bit reduction periods in the projection stage."})
    geta_pruning_periods: int = field(default=5, metadata={
        "help": "Number of periods over which units are selected and forgotten in the joint stage."})
    geta_importance_weights: Optional[str] = field(default=None, metadata={
        "help": "Saliency criteria weights, e.g. 'magnitude=0.5,taylor_first_order=0.5' "
                f"(names: {', '.join(IMPORTANCE_CRITERIA)}; default 0.2 each)."})
    geta_group_divisible: int = field(default=1, metadata={
        "help": "Keep a multiple of this many units per family (hardware-friendly widths)."})
    geta_include_modules: Optional[List[str]] = field(default=None, metadata={
        "help": "Glob patterns of module names to quantize (default: every linear layer: nn.Linear, GPT-2's Conv1D)."})
    geta_exclude_modules: Optional[List[str]] = field(default=None, metadata={
        "help": "Glob patterns of module names never quantized."})
    geta_unprunable_modules: Optional[List[str]] = field(default=None, metadata={
        "help": "Glob patterns of module names whose heads/channels are never pruned."})
    geta_min_units_per_family: int = field(default=1, metadata={
        "help": "Units every family keeps (at least 1: a layer is never removed entirely)."})
    geta_quant_lr: float = field(default=1e-3, metadata={
        "help": "Learning rate of the quantizer scalars d, q_m, t."})
    geta_act_calibration_batches: int = field(default=4, metadata={
        "help": "Training batches used to initialise input (activation) ranges."})
    geta_act_calibration_percentile: float = field(default=100.0, metadata={
        "help": "Percentile of |input| used as the initial clip (100 = max)."})
    geta_target_relative_bops: Optional[float] = field(default=None, metadata={
        "help": "BOPs of the compressed model relative to dense fp32, in (0, 1], reached when the "
                "bits freeze by lowering the bits of the least sensitive layers per BOP saved "
                "(default: none, bits = rounded learned bits)."})
    geta_compress_frozen: bool = field(default=False, metadata={
        "help": "Also prune and quantize parameters with requires_grad=False (default: frozen "
                "parameters are left untouched)."})
    geta_restart_compression_on_resume: bool = field(default=False, metadata={
        "help": "Resuming from a checkpoint without optimizer state (e.g. save_only_model=True) is "
                "refused, because GETA's compression state is lost; with this flag the compression "
                "restarts from the checkpoint's weights over the remaining steps instead."})
    geta_optimizer: str = field(default="adamw", metadata={
        "help": "Dense update of QASSO: 'adamw', 'adam' or 'sgd'.", "choices": ["adamw", "adam", "sgd"]})
    geta_tune_cpu_allocator: bool = field(default=True, metadata={
        "help": "On Linux/CPU, keep freed tensors in the glibc heap (avoids page-fault storms)."})
    geta_distillation_weight: float = field(default=0.5, metadata={
        "help": "Knowledge distillation: weight w in [0, 1] of the KD term, loss = (1 - w) * task "
                "loss + w * KD. Used only when the trainer gets a teacher_model."})
    geta_distillation_temperature: float = field(default=2.0, metadata={
        "help": "Knowledge distillation: softmax temperature T > 0 of the logit KD term (scaled by "
                "T^2). Used only when the trainer gets a teacher_model."})

    def __post_init__(self):
        super().__post_init__()
        # fail at parse time, naming the command-line flag, not later inside GETATrainer
        try:
            self.to_geta_config()
        except ValueError as e:
            msg = re.sub(r"GETAConfig\.(\w+)", r"--geta_\1 (GETAConfig.\1)", str(e))
            raise ValueError(msg) from None
        # KD is a trainer concern, not a GETAConfig field: checked here, naming the flag
        check_distillation_weight(self.geta_distillation_weight,
                                  "GETATrainingArguments: --geta_distillation_weight")
        check_distillation_temperature(self.geta_distillation_temperature,
                                       "GETATrainingArguments: --geta_distillation_temperature")

    def to_geta_config(self) -> GETAConfig:
        """The :class:`GETAConfig` these arguments describe (validated)."""
        return GETAConfig(
            target_group_sparsity=self.geta_target_group_sparsity,
            weight_bits=tuple(self.geta_weight_bits) if self.geta_weight_bits is not None else None,
            activation_bits=tuple(self.geta_activation_bits) if self.geta_activation_bits else None,
            bit_reduction=self.geta_bit_reduction,
            quantizer=self.geta_quantizer,
            warmup=_stage(self.geta_warmup, "geta_warmup"),
            projection=_stage(self.geta_projection, "geta_projection"),
            joint=_stage(self.geta_joint, "geta_joint"),
            projection_periods=self.geta_projection_periods,
            pruning_periods=self.geta_pruning_periods,
            importance_weights=_weights(self.geta_importance_weights),
            group_divisible=self.geta_group_divisible,
            include_modules=tuple(self.geta_include_modules) if self.geta_include_modules else None,
            exclude_modules=tuple(self.geta_exclude_modules or ()),
            unprunable_modules=tuple(self.geta_unprunable_modules or ()),
            min_units_per_family=self.geta_min_units_per_family,
            quant_lr=self.geta_quant_lr,
            act_calibration_batches=self.geta_act_calibration_batches,
            act_calibration_percentile=self.geta_act_calibration_percentile,
            target_relative_bops=self.geta_target_relative_bops,
            compress_frozen=self.geta_compress_frozen,
        )
