"""`GETAConfig`: every GETA knob in one validated, JSON-serialisable dataclass.

The fields mirror docs/method.md (§0 sparsity target, §1 quantizer, §3 QASSO schedule and
importance scoring). Validation happens on construction: a bad value raises ``ValueError`` naming
the field and the allowed range, and nothing the user passed is rewritten.

A validated config is immutable (a frozen dataclass; sequences are stored as tuples and the
importance weights as a read-only dict copy, never as the caller's objects). Derive a changed
config with ``dataclasses.replace(cfg, field=value)``, which validates again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = ["GETAConfig", "Schedule", "IMPORTANCE_CRITERIA", "IMPORTANCE_SOURCES", "QUANTIZER_KINDS",
           "FrozenDict"]

#: The five saliency criteria of method §3.3, in a fixed order.
IMPORTANCE_CRITERIA = (
    "magnitude",
    "avg_magnitude",
    "cosine_similarity",
    "taylor_first_order",
    "taylor_second_order",
)
#: ``linear``: Q(x) = sign(x) d round(min(|x|, q_m) / d);  ``nonlinear``: same with min(|x|, q_m)^t.
QUANTIZER_KINDS = ("linear", "nonlinear")
#: what the saliency's gradient ``g`` is (``GETAConfig.importance_source``)
IMPORTANCE_SOURCES = ("gradient", "update")
MIN_BITS, MAX_BITS = 2, 16

StageLength = Union[int, float]


def _default_importance() -> dict:
    return {name: 0.2 for name in IMPORTANCE_CRITERIA}


class FrozenDict(dict):
    """A read-only ``dict`` (JSON-serialisable, picklable): every mutating method raises."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("GETAConfig is immutable after validation; derive a changed config with "
                        "dataclasses.replace(cfg, importance_weights={...})")

    __setitem__ = __delitem__ = __ior__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _as_tuple(v: Any) -> Any:
    """A list/tuple (not a string) as a new tuple; anything else unchanged (validated later)."""
    if isinstance(v, (list, tuple)):
        return tuple(v)
    return v


@dataclass(frozen=True)
class Schedule:
    """Absolute stage boundaries (optimizer steps, 0-based step index ``k``).

    Step ``k`` belongs to warm-up if ``k < warmup_end``, projection if ``k < projection_end``,
    joint if ``k < joint_end``, cool-down otherwise.
    """

    total_steps: int
    warmup_end: int
    projection_end: int
    joint_end: int

    @property
    def warmup_steps(self) -> int:
        """Number of warm-up steps."""
        return self.warmup_end

    @property
    def projection_steps(self) -> int:
        """Number of projection-stage steps."""
        return self.projection_end - self.warmup_end

    @property
    def joint_steps(self) -> int:
        """Number of joint-stage steps."""
        return self.joint_end - self.projection_end

    @property
    def cooldown_steps(self) -> int:
        """Number of cool-down steps."""
        return self.total_steps - self.joint_end

    def stage(self, step: int) -> str:
        """Stage name of 0-based step ``step``: warmup, projection, joint or cooldown."""
        if step < self.warmup_end:
            return "warmup"
        if step < self.projection_end:
            return "projection"
        if step < self.joint_end:
            return "joint"
        return "cooldown"


def _err(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"GETAConfig.{name}: got {value!r}; allowed: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class GETAConfig:
    """Configuration of joint structured pruning and mixed-precision QAT (GETA).

    Args:
        target_group_sparsity: fraction of prunable units (heads, kv-groups, MLP channels) to
            remove, in ``[0, 1)``. Counted in units, as in the paper (method §0).
        weight_bits: ``(b_l, b_u)`` bit range for weights, integers in ``[2, 16]`` with
            ``b_l <= b_u``. Layers start at ``b_u``.
        activation_bits: ``(b_l, b_u)`` for layer inputs, or ``None`` for weight-only quantization.
        bit_reduction: how much the upper bit bound drops at each projection period (§3.2).
            The bound never goes below ``b_l``.
        quantizer: ``"linear"`` (``t = 1``, no parameter; the default) or ``"nonlinear"`` (the
            paper's learned exponent ``t``). Linear is the default because a learned ``t`` warps
            every weight to ``sign(x)|x|^t`` as it drifts (README, "Deliberate differences").
        warmup, projection, joint: stage lengths. A ``float`` in ``[0, 1]`` is a fraction of the
            total optimizer steps, an ``int >= 0`` an absolute number of steps. Cool-down is
            whatever remains. The defaults (0.3 / 0.2 / 0.1, one pruning period) prune once, at
            the middle of the run, after the task is learned, and leave 0.4 of the run to
            recover (method §7.5).
        projection_periods: number of max-bit reduction periods in the projection stage (``>= 1``).
        pruning_periods: number of periods over which the ``K`` units are selected and forgotten
            in the joint stage (``>= 1``).
        importance_weights: weights of the five saliency criteria (§3.3); non-negative, not all 0.
        importance_source: the ``g`` of the saliency criteria. ``"gradient"`` (default): the
            loss gradient, its per-unit statistics averaged over a window of steps before each
            pruning period (as long as the period), so that the Taylor terms estimate the loss
            change of removing a unit. ``"update"`` (the paper's): the displacement of the one
            optimizer step that starts the period (with Adam a per-element normalised
            direction, not a gradient). See method §7.5 and README, "Deliberate differences".
        group_divisible: keep a multiple of this many units per family (hardware-friendly widths).
        include_modules: glob patterns of module names to quantize (``None``: every Linear).
        exclude_modules: glob patterns of module names never quantized.
        unprunable_modules: glob patterns of module names whose families are never pruned.
        min_units_per_family: units every family keeps, at least 1 (never remove a whole layer).
        quant_lr: learning rate of the quantizer scalars ``d``, ``q_m``, ``t``.
        act_calibration_batches: batches used to initialise activation ranges from data.
        act_calibration_percentile: percentile of ``|x|`` used as the initial activation clip
            ``q_m`` (100 = max), in ``(0, 100]``.
        target_relative_bops: BOPs of the compressed model relative to dense fp32 (in
            ``(0, 1]``) to reach when the bits freeze: weight layers then lose bits where the
            Fisher-weighted quantization error per BOP saved is smallest (never below
            ``b_l``). ``None``: the bits are the rounded learned ones. Needs a BOPs estimator
            (``GETATrainer`` builds one; ``QASSO(..., bops_estimator=...)`` otherwise).
        compress_frozen: also prune and quantizer-train parameters with ``requires_grad=False``.
            By default (``False``) frozen parameters are left as they are: families (heads,
            channels) touching a frozen parameter are not pruned, layers with a frozen weight
            are not quantized by :func:`geta_hf.prepare_model`, and QASSO never updates the
            quantizer scalars of a layer whose weight is frozen (all logged).

    The config is immutable once validated; use ``dataclasses.replace(cfg, ...)`` to change it.
    """

    # ``metadata["help"]``: the command-line help of the ``--geta_<field>`` flag that
    # :class:`geta_hf.GETATrainingArguments` generates from each field (defaults come from here)
    target_group_sparsity: float = field(default=0.5, metadata={
        "help": "Fraction of prunable units (attention heads, GQA kv-groups, MLP channels) to "
                "remove, in [0, 1)."})
    weight_bits: Sequence[int] = field(default=(4, 16), metadata={
        "help": "Weight bit range: two integers b_l b_u with 2 <= b_l <= b_u <= 16 (layers "
                "start at b_u)."})
    activation_bits: Optional[Sequence[int]] = field(default=None, metadata={
        "help": "Input (activation) bit range b_l b_u; omit for weight-only quantization."})
    bit_reduction: int = field(default=2, metadata={
        "help": "Bits removed from the upper bound at each projection period (never below b_l)."})
    quantizer: str = field(default="linear", metadata={
        "help": "Quantizer kind: 'linear' (default) or 'nonlinear' (the paper's learned "
                "exponent t).", "choices": QUANTIZER_KINDS})
    warmup: StageLength = field(default=0.3, metadata={
        "help": "Warm-up length: a fraction of the training steps (<= 1) or a number of steps "
                "(> 1)."})
    projection: StageLength = field(default=0.2, metadata={
        "help": "Projection-stage length (bit-range projection, upper bound shrinking): "
                "fraction or steps."})
    joint: StageLength = field(default=0.1, metadata={
        "help": "Joint-stage length (pruning periods with forget rate and quant step): fraction "
                "or steps. Cool-down (frozen integer bits) takes the rest."})
    projection_periods: int = field(default=5, metadata={
        "help": "Number of max-bit reduction periods in the projection stage."})
    pruning_periods: int = field(default=1, metadata={
        "help": "Number of periods over which units are selected and forgotten in the joint "
                "stage."})
    importance_weights: dict = field(default_factory=_default_importance, metadata={
        "help": "Saliency criteria weights, e.g. 'magnitude=0.5,taylor_first_order=0.5' "
                f"(names: {', '.join(IMPORTANCE_CRITERIA)}; default 0.2 each)."})
    importance_source: str = field(default="gradient", metadata={
        "help": "The g of the saliency: 'gradient' (default: the loss gradient averaged over a "
                "window before each pruning period) or 'update' (the paper's one-step optimizer "
                "displacement).", "choices": IMPORTANCE_SOURCES})
    group_divisible: int = field(default=1, metadata={
        "help": "Keep a multiple of this many units per family (hardware-friendly widths)."})
    include_modules: Optional[Sequence[str]] = field(default=None, metadata={
        "help": "Glob patterns of module names to quantize (default: every registered linear "
                "layer type, e.g. nn.Linear and GPT-2's Conv1D)."})
    exclude_modules: Sequence[str] = field(default=(), metadata={
        "help": "Glob patterns of module names never quantized."})
    unprunable_modules: Sequence[str] = field(default=(), metadata={
        "help": "Glob patterns of module names whose heads/channels are never pruned."})
    min_units_per_family: int = field(default=1, metadata={
        "help": "Units every family keeps (at least 1: a layer is never removed entirely)."})
    quant_lr: float = field(default=1e-3, metadata={
        "help": "Learning rate of the quantizer scalars d, q_m, t."})
    act_calibration_batches: int = field(default=4, metadata={
        "help": "Training batches used to initialise input (activation) ranges."})
    act_calibration_percentile: float = field(default=100.0, metadata={
        "help": "Percentile of |input| used as the initial clip (100 = max)."})
    target_relative_bops: Optional[float] = field(default=None, metadata={
        "help": "BOPs of the compressed model relative to dense fp32, in (0, 1], reached when "
                "the bits freeze by lowering the bits of the least sensitive layers per BOP "
                "saved (default: none, bits = rounded learned bits)."})
    compress_frozen: bool = field(default=False, metadata={
        "help": "Also prune and quantize parameters with requires_grad=False (default: frozen "
                "parameters are left untouched)."})

    def __post_init__(self) -> None:
        # never keep the caller's mutable objects: sequences become tuples, the weights a copy
        for name in ("weight_bits", "activation_bits", "include_modules", "exclude_modules",
                     "unprunable_modules"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if isinstance(self.importance_weights, Mapping):
            object.__setattr__(self, "importance_weights", FrozenDict(self.importance_weights))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one."""
        s = self.target_group_sparsity
        if not _is_real(s) or not (0.0 <= s < 1.0) or math.isnan(s):
            raise _err("target_group_sparsity", s, "a number in [0, 1)")
        self._check_bits("weight_bits", self.weight_bits, optional=False)
        self._check_bits("activation_bits", self.activation_bits, optional=True)
        if not _is_int(self.bit_reduction) or self.bit_reduction < 0:
            raise _err("bit_reduction", self.bit_reduction, "an integer >= 0")
        if self.quantizer not in QUANTIZER_KINDS:
            raise _err("quantizer", self.quantizer, " or ".join(repr(k) for k in QUANTIZER_KINDS))
        fractions = 0.0
        for name in ("warmup", "projection", "joint"):
            v = getattr(self, name)
            if _is_int(v):
                if v < 0:
                    raise _err(name, v, "an int >= 0 (steps) or a float in [0, 1] (fraction)")
            elif isinstance(v, float):
                if not (0.0 <= v <= 1.0):
                    raise _err(name, v, "an int >= 0 (steps) or a float in [0, 1] (fraction)")
                fractions += v
            else:
                raise _err(name, v, "an int >= 0 (steps) or a float in [0, 1] (fraction)")
        if fractions > 1.0 + 1e-9:
            raise ValueError(
                "GETAConfig.warmup/projection/joint: the stage fractions sum to "
                f"{fractions:g}; allowed: a sum <= 1 (cool-down takes the rest)"
            )
        for name in ("projection_periods", "pruning_periods", "group_divisible",
                     "min_units_per_family", "act_calibration_batches"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise _err(name, v, "an integer >= 1")
        w = self.importance_weights
        if not isinstance(w, Mapping) or not w:
            raise _err("importance_weights", w, f"a dict over {list(IMPORTANCE_CRITERIA)}")
        for k, v in w.items():
            if k not in IMPORTANCE_CRITERIA:
                raise _err("importance_weights", k, f"keys among {list(IMPORTANCE_CRITERIA)}")
            if not _is_real(v) or not (v >= 0.0) or math.isinf(v):
                raise _err(f"importance_weights[{k!r}]", v, "a finite number >= 0")
        if sum(w.values()) <= 0:
            raise _err("importance_weights", w, "at least one weight > 0")
        if self.importance_source not in IMPORTANCE_SOURCES:
            raise _err("importance_source", self.importance_source,
                       " or ".join(repr(k) for k in IMPORTANCE_SOURCES))
        if self.include_modules is not None:
            self._check_patterns("include_modules", self.include_modules)
            if len(self.include_modules) == 0:
                raise _err("include_modules", self.include_modules,
                           "None (every Linear) or a non-empty list of glob patterns")
        self._check_patterns("exclude_modules", self.exclude_modules)
        self._check_patterns("unprunable_modules", self.unprunable_modules)
        lr = self.quant_lr
        if not _is_real(lr) or not (lr > 0) or math.isinf(lr):
            raise _err("quant_lr", lr, "a finite number > 0")
        p = self.act_calibration_percentile
        if not _is_real(p) or not (0.0 < p <= 100.0):
            raise _err("act_calibration_percentile", p, "a number in (0, 100]")
        b = self.target_relative_bops
        if b is not None and (not _is_real(b) or not (0.0 < b <= 1.0)):
            raise _err("target_relative_bops", b, "None or a number in (0, 1]")
        if not isinstance(self.compress_frozen, bool):
            raise _err("compress_frozen", self.compress_frozen, "True or False")

    @staticmethod
    def _check_bits(name: str, v: Any, optional: bool) -> None:
        allowed = f"a pair (b_l, b_u) of integers with {MIN_BITS} <= b_l <= b_u <= {MAX_BITS}"
        if v is None:
            if optional:
                return
            raise _err(name, v, allowed)
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
            raise _err(name, v, allowed + (" or None" if optional else ""))
        lo, hi = v
        if not (_is_int(lo) and _is_int(hi)) or not (MIN_BITS <= lo <= hi <= MAX_BITS):
            raise _err(name, v, allowed + (" or None" if optional else ""))

    @staticmethod
    def _check_patterns(name: str, v: Any) -> None:
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            raise _err(name, v, "a list of glob patterns (strings)")
        for p in v:
            if not isinstance(p, str) or not p:
                raise _err(name, p, "non-empty strings (glob patterns)")

    # ------------------------------------------------------------------ derived values
    @property
    def nonlinear(self) -> bool:
        """Whether the quantizer has the learned exponent ``t``."""
        return self.quantizer == "nonlinear"

    @property
    def quantize_activations(self) -> bool:
        """Whether layer inputs are quantized too."""
        return self.activation_bits is not None

    def resolve_schedule(self, total_steps: int) -> Schedule:
        """Absolute stage boundaries for a run of ``total_steps`` optimizer steps."""
        if not _is_int(total_steps) or total_steps < 1:
            raise ValueError(f"total_steps: got {total_steps!r}; allowed: an integer >= 1")
        lengths = []
        for name in ("warmup", "projection", "joint"):
            v = getattr(self, name)
            lengths.append(int(round(v * total_steps)) if isinstance(v, float) else v)
        if sum(lengths) > total_steps:
            raise ValueError(
                f"GETAConfig.warmup/projection/joint: the stages need {sum(lengths)} steps "
                f"({lengths[0]} + {lengths[1]} + {lengths[2]}) but the run has only "
                f"total_steps={total_steps}; allowed: a sum <= total_steps"
            )
        w, p, j = lengths
        return Schedule(total_steps=total_steps, warmup_end=w, projection_end=w + p,
                        joint_end=w + p + j)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """A JSON-safe dict (tuples become lists); ``from_dict`` inverts it exactly."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            elif isinstance(v, list):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "GETAConfig":
        """Inverse of :meth:`to_dict` (validated); unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"GETAConfig.from_dict: expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"GETAConfig.from_dict: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)  # lists become tuples in __post_init__

    def to_json(self) -> str:
        """The config as a JSON string (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GETAConfig":
        """Parse ``to_json`` output; a key given twice in one object is refused (``ValueError``)."""
        return cls.from_dict(json.loads(text, object_pairs_hook=_no_duplicate_keys))

    def diff(self, other: "GETAConfig") -> dict:
        """``{field: (self's value, other's value)}`` for every field that differs (JSON form)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GETAConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())


def _no_duplicate_keys(pairs) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"GETAConfig.from_json: key {k!r} appears twice; allowed: each key once")
        out[k] = v
    return out
