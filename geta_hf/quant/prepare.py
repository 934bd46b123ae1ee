"""`prepare_model`: insert GETA quantizers into a model; `calibrate_activations`: set input ranges."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from typing import Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from ..config import GETAConfig
from .quantizer import GETAQuantizer
from ..registry import float_linear_types, linear_type_of
from ..surgery import set_submodule
from .layers import PackedLayer, QuantLayerMixin, quant_layers

__all__ = ["prepare_model", "calibrate_activations", "quantization_bypassed",
           "input_quantizers_disabled", "QUANT_SPEC_ATTR"]

logger = logging.getLogger(__name__)

#: Attribute set on a prepared model: the quantization-relevant part of its GETAConfig.
QUANT_SPEC_ATTR = "_geta_quant_spec"


def _quant_spec(cfg: GETAConfig) -> dict:
    return {
        "quantizer": cfg.quantizer,
        "weight_bits": list(cfg.weight_bits),
        "activation_bits": None if cfg.activation_bits is None else list(cfg.activation_bits),
        "include_modules": None if cfg.include_modules is None else list(cfg.include_modules),
        "exclude_modules": list(cfg.exclude_modules),
        "compress_frozen": cfg.compress_frozen,
    }


def _type_names() -> str:
    return ", ".join(t.__name__ for t in float_linear_types())


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _shared_weights(model: nn.Module) -> set:
    """ids of parameters used by more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def _select_layers(model: nn.Module, cfg: GETAConfig):
    float_types = float_linear_types()
    candidates = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, float_types) and not isinstance(m, (QuantLayerMixin, PackedLayer))]
    names = [n for n, _ in candidates] + [n for n, _ in quant_layers(model)]
    for field_name, patterns in (("include_modules", cfg.include_modules or ()),
                                 ("exclude_modules", cfg.exclude_modules)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                example = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise ValueError(
                    f"GETAConfig.{field_name}: pattern {p!r} matches no quantizable module "
                    f"({_type_names()}) of "
                    f"{type(model).__name__}; module names look like: {example}")
    shared = _shared_weights(model)
    chosen, frozen, tied = [], [], []
    for name, mod in candidates:
        if cfg.include_modules is not None and not _matches(name, cfg.include_modules):
            continue
        if _matches(name, cfg.exclude_modules):
            continue
        if id(mod.weight) in shared:
            tied.append(name)
            continue
        if not cfg.compress_frozen and not mod.weight.requires_grad:
            frozen.append(name)
            continue
        chosen.append((name, mod))
    if frozen:
        logger.info("geta_hf: not quantizing %d layer(s) with a frozen weight (requires_grad="
                    "False): %s%s; set GETAConfig(compress_frozen=True) to quantize them",
                    len(frozen), ", ".join(frozen[:4]), " ..." if len(frozen) > 4 else "")
    if tied:  # a warning when the user named them in include_modules, else routine
        level = logging.WARNING if cfg.include_modules is not None else logging.INFO
        logger.log(level, "geta_hf: not quantizing %s: the weight is tied to another module "
                   "(e.g. an LM head tied to the embeddings)", ", ".join(tied))
    return chosen, frozen, tied


def prepare_model(model: nn.Module, cfg: GETAConfig,
                  calibration_data: Optional[Iterable] = None) -> nn.Module:
    """Insert GETA fake quantizers into ``model`` (in place) and return it.

    Every linear layer (``nn.Linear`` and the types registered with
    :func:`geta_hf.registry.register_linear_type`, e.g. GPT-2's ``Conv1D``) selected by
    ``cfg.include_modules`` / ``cfg.exclude_modules`` becomes its quantized form (``nn.Linear``:
    :class:`QuantLinear`) sharing the
    original parameters, with its weight quantizer initialised at ``max(cfg.weight_bits)`` bits
    (``q_m = max|W|``, ``t = 1``; method §1.4). Layers whose weight is tied to another module
    (e.g. an LM head tied to the embeddings) are left in float and logged, and so are layers
    whose weight is frozen (``requires_grad=False``) unless ``cfg.compress_frozen``.

    With ``cfg.activation_bits`` set, each layer also gets an input quantizer. Its range comes from
    data: pass ``calibration_data`` (an iterable of model-input dicts or tensors) here, or call
    :func:`calibrate_activations` later; until then the input quantizers pass values through.
    ``calibration_data`` without ``cfg.activation_bits`` is a ``ValueError`` (nothing to calibrate).

    Idempotent: preparing an already prepared model with the same quantization settings is a
    no-op; different settings raise ``ValueError``. The model keeps its class (an HF
    ``PreTrainedModel`` stays one).
    """
    if not isinstance(cfg, GETAConfig):
        raise TypeError(f"prepare_model: cfg must be a GETAConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if calibration_data is not None and not cfg.quantize_activations:
        raise ValueError("prepare_model: calibration_data was given but GETAConfig.activation_bits "
                         "is None (weight-only quantization has no input ranges to calibrate); "
                         "drop calibration_data or set activation_bits")
    spec = _quant_spec(cfg)
    existing = getattr(model, QUANT_SPEC_ATTR, None)
    if existing is not None:
        if existing != spec:
            raise ValueError(
                "prepare_model: the model is already prepared with different quantization "
                f"settings {existing}; requested {spec}. Start from the float model to change them.")
        if calibration_data is not None:
            calibrate_activations(model, calibration_data, cfg)
        return model
    chosen, frozen, tied = _select_layers(model, cfg)
    if not chosen:
        why = (f"; {len(frozen)} are left out because their weight is frozen (requires_grad="
               "False): set GETAConfig(compress_frozen=True) to quantize them") if frozen else ""
        if tied:
            why += f"; {', '.join(tied)} share(s) a tied weight, which stays in float"
        raise ValueError(
            f"prepare_model: no quantizable layer ({_type_names()}) of {type(model).__name__} was selected for "
            f"quantization; check GETAConfig.include_modules / exclude_modules{why}")
    w_bits = max(cfg.weight_bits)
    for name, mod in chosen:
        new = linear_type_of(mod).quant_cls.from_float(
            mod, nonlinear=cfg.nonlinear, quantize_input=cfg.quantize_activations)
        with torch.no_grad():
            new.weight_quantizer.init_range(mod.weight.detach().abs().amax().float(), w_bits)
        set_submodule(model, name, new)
    setattr(model, QUANT_SPEC_ATTR, spec)
    if calibration_data is not None:
        calibrate_activations(model, calibration_data, cfg)
    return model


@contextlib.contextmanager
def quantization_bypassed(model: nn.Module) -> Iterator[None]:
    """Within the block every quantized layer of ``model`` computes in full precision."""
    layers = [m for _, m in quant_layers(model)]
    previous = [m.quant_bypass for m in layers]
    for m in layers:
        m.quant_bypass = True
    try:
        yield
    finally:
        for m, prev in zip(layers, previous):
            m.quant_bypass = prev


@contextlib.contextmanager
def input_quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block every input (activation) quantizer of ``model`` passes values through."""
    qs = [m for m in model.modules()
          if isinstance(getattr(m, "act_quantizer", None), GETAQuantizer)]
    previous = [m.act_quantizer.enabled for m in qs]
    for m in qs:
        m.act_quantizer.enabled = False
    try:
        yield
    finally:
        for m, prev in zip(qs, previous):
            m.act_quantizer.enabled = prev


def _run_model(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _nonfinite_input(batch) -> Optional[str]:
    """The name of the first floating-point input of ``batch`` holding NaN or Inf, else None."""
    if isinstance(batch, Mapping):
        items = list(batch.items())
    elif isinstance(batch, (tuple, list)):
        items = [(f"[{i}]", v) for i, v in enumerate(batch)]
    else:
        items = [("input", batch)]
    for key, v in items:
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return str(key)
    return None


def _abs_percentile(x: torch.Tensor, percentile: float, gen: torch.Generator) -> torch.Tensor:
    a = x.detach().abs().flatten().float()
    if percentile >= 100.0:
        return a.amax()
    if a.numel() > 1 << 20:  # torch.quantile is limited in size; a fixed random subsample suffices
        idx = torch.randint(0, a.numel(), (1 << 20,), generator=gen, device="cpu").to(a.device)
        a = a[idx]
    return torch.quantile(a, percentile / 100.0)


def _merge_finite(stats: dict, batch_stats: dict, index: int) -> None:
    """Fold one batch's ranges into ``stats`` after checking them (one host sync per batch)."""
    if batch_stats and not bool(torch.isfinite(torch.stack(list(batch_stats.values()))).all()):
        layer = next(n for n, v in batch_stats.items() if not bool(torch.isfinite(v)))
        raise ValueError(f"calibrate_activations: calibration batch {index} (0-based) gives a "
                         f"NaN or Inf input to layer {layer!r}; allowed: batches on which every "
                         "layer input is finite")
    for name, v in batch_stats.items():
        stats[name] = v if name not in stats else torch.maximum(stats[name], v)


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable, cfg: GETAConfig,
                          max_batches: Optional[int] = None) -> dict:
    """Initialise every input quantizer's range from data (method §6.1.4 fix).

    Runs the model in eval mode, in full precision, on up to ``max_batches`` (default
    ``cfg.act_calibration_batches``) batches; each layer's clip ``q_m`` becomes the largest
    ``cfg.act_calibration_percentile``-th percentile of ``|input|`` seen, and ``d`` is set for
    ``max(cfg.activation_bits)`` bits. Returns ``{layer name: q_m}``.

    A batch holding NaN or Inf, or one on which some layer's input is not finite, raises
    ``ValueError`` naming the batch index (0-based) and the input or layer; no range is set.
    """
    if cfg.activation_bits is None:
        raise ValueError("calibrate_activations: GETAConfig.activation_bits is None "
                         "(weight-only quantization has no activation ranges to calibrate)")
    layers = [(n, m) for n, m in quant_layers(model) if m.act_quantizer is not None]
    if not layers:
        raise ValueError("calibrate_activations: the model has no input quantizers; call "
                         "prepare_model with GETAConfig.activation_bits set first")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"calibrate_activations: max_batches={max_batches!r} is invalid; "
                         "allowed: an integer >= 1, or None for GETAConfig.act_calibration_batches")
    limit = max_batches or cfg.act_calibration_batches
    stats: dict[str, torch.Tensor] = {}
    batch_stats: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def hook_for(name):
        def hook(_mod, args):
            v = _abs_percentile(args[0], cfg.act_calibration_percentile, gen)
            batch_stats[name] = v if name not in batch_stats else torch.maximum(batch_stats[name], v)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with quantization_bypassed(model):
            for batch in batches:
                if seen >= limit:
                    break
                bad = _nonfinite_input(batch)
                if bad is not None:
                    raise ValueError(f"calibrate_activations: calibration batch {seen} (0-based) "
                                     f"holds NaN or Inf in input {bad!r}; allowed: finite values")
                batch_stats.clear()
                _run_model(model, batch)
                _merge_finite(stats, batch_stats, seen)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate_activations: no calibration batch was given")
    bits = max(cfg.activation_bits)
    missing = [n for n, _ in layers if n not in stats]
    if missing:
        raise ValueError(f"calibrate_activations: layers {missing[:3]} never ran on the calibration "
                         "batches; exclude them (GETAConfig.exclude_modules) or use other batches")
    for name, m in layers:
        m.act_quantizer.init_range(stats[name], bits)
    return {n: float(stats[n]) for n, _ in layers}
