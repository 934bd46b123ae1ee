"""QASSO's set-up checks and its dense optimizer: argument validation with clear errors,
torch's optimizer for the variant, the warnings a schedule deserves, and the per-step check for
non-finite gradients (one host sync)."""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import AbstractSet, List, Sequence, Tuple

import torch

from ..config import GETAConfig
from ..quant.layers import uncalibrated_inputs
from .schedule import StagePlan

__all__ = ["VARIANTS", "check_args", "dense_optimizer", "check_quantizers", "check_budget",
           "grads_finite"]

logger = logging.getLogger("geta_hf.optim.qasso")

#: Supported dense-update variants (method §3.1).
VARIANTS = ("adamw", "adam", "sgd")


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _check_positive(name: str, v) -> float:
    if not _is_real(v) or not math.isfinite(float(v)) or not float(v) > 0:
        raise ValueError(f"QASSO: {name}={v!r} is invalid; allowed: a finite number > 0")
    return float(v)


def check_args(cfg: GETAConfig, variant: str, lr, total_steps, quant_lr, weight_decay,
               skip_nonfinite) -> Tuple[float, float, float]:
    """Validate QASSO's arguments (``ValueError`` naming the argument and what is allowed);
    returns ``(lr, quant_lr, weight_decay)`` with the defaults filled in."""
    if variant not in VARIANTS:
        raise ValueError(f"QASSO: variant={variant!r} is not supported; allowed: "
                         + ", ".join(repr(v) for v in VARIANTS))
    lr = _check_positive("lr", lr)
    if total_steps is None or not isinstance(total_steps, int) or isinstance(total_steps, bool) \
            or total_steps < 1:
        raise ValueError(f"QASSO: total_steps={total_steps!r} is invalid; allowed: an integer "
                         ">= 1 (the number of optimizer steps of the run)")
    quant_lr = _check_positive("quant_lr", cfg.quant_lr if quant_lr is None else quant_lr)
    if weight_decay is None:
        weight_decay = 0.01 if variant == "adamw" else 0.0
    if not _is_real(weight_decay) or not weight_decay >= 0 or not math.isfinite(weight_decay):
        raise ValueError(f"QASSO: weight_decay={weight_decay!r} is invalid; allowed: a finite "
                         "number >= 0")
    if not isinstance(skip_nonfinite, bool):
        raise ValueError(f"QASSO: skip_nonfinite={skip_nonfinite!r} is invalid; allowed: True "
                         "or False")
    return lr, quant_lr, float(weight_decay)


def dense_optimizer(variant: str, weights: List[torch.Tensor], quant: List[torch.Tensor],
                    lr: float, quant_lr: float, weight_decay: float, betas: Sequence[float],
                    eps: float, momentum: float, dampening: float, nesterov: bool,
                    no_decay: AbstractSet[int] = frozenset()) -> torch.optim.Optimizer:
    """torch's optimizer for ``variant`` on the groups ``"weights"``, ``"quant"`` (the
    quantizer scalars: ``quant_lr``, no weight decay; left out when empty) and, when
    ``weight_decay`` is nonzero, ``"weights_no_decay"``: the weights whose ``id`` is in
    ``no_decay`` (left out when none is)."""
    if not weights:
        raise ValueError("QASSO: the model has no trainable parameter besides quantizer scalars")
    spared = [p for p in weights if id(p) in no_decay] if weight_decay else []
    decayed = [p for p in weights if id(p) not in no_decay] if spared else weights
    if not decayed:  # nothing decays: one group without decay
        decayed, spared, weight_decay = spared, [], 0.0
    groups = [{"params": decayed, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
    if quant:
        groups.append({"params": quant, "lr": quant_lr, "weight_decay": 0.0, "name": "quant"})
    if spared:
        groups.append({"params": spared, "lr": lr, "weight_decay": 0.0,
                       "name": "weights_no_decay"})
    if variant == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)
    if variant == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, dampening=dampening,
                           nesterov=nesterov, foreach=True)


def check_one_device(named: dict, quant_ids: AbstractSet[int]) -> None:
    """QASSO keeps its unit and quantizer tables as single tensors: every trainable parameter
    must live on one device (a model spread with ``device_map`` is refused, naming a parameter
    on each side)."""
    trainable = [(n, p) for n, p in named.items() if p.requires_grad or id(p) in quant_ids]
    if not trainable:
        return
    first_name, first = trainable[0]
    other = next(((n, p) for n, p in trainable if p.device != first.device), None)
    if other is not None:
        raise ValueError(f"QASSO: the model's trainable parameters are on more than one device "
                         f"({first_name!r} on {first.device}, {other[0]!r} on {other[1].device}); "
                         "QASSO needs them on one device (load the model without a multi-device "
                         "device_map, or .to() one device)")


def check_quantizers(layers, cfg: GETAConfig) -> None:
    """Refuse uncalibrated input quantizers, or input quantizers ``cfg`` does not describe."""
    uncal = uncalibrated_inputs(layers)
    if uncal:
        raise ValueError(
            f"QASSO: the input (activation) quantizers of {len(uncal)} layer(s) are not "
            f"calibrated (e.g. {uncal[0]}); call geta_hf.calibrate_activations(model, batches, "
            "cfg) (or pass calibration_data to geta_hf.prepare_model) before creating QASSO")
    has_act = any(m.act_quantizer is not None for _, m in layers)
    if has_act and cfg.activation_bits is None:
        raise ValueError("QASSO: cfg.activation_bits is None but the model has input "
                         "quantizers; pass the GETAConfig the model was prepared with")
    if cfg.activation_bits is not None and layers and not has_act:
        logger.warning("QASSO: cfg.activation_bits=%s is ignored: the model has no input "
                       "quantizers", cfg.activation_bits)
    if not layers:
        logger.info("QASSO: the model has no quantized layer: pruning only")


def check_budget(plan: StagePlan, max_prunable: int, cfg: GETAConfig) -> None:
    """Warn when the target K cannot be reached or the joint stage is too short."""
    K = plan.target
    if K > max_prunable:
        logger.warning(
            "QASSO: target_group_sparsity=%s asks for K=%d of %d units, but min_units/"
            "group_divisible allow at most %d; pruning as many as allowed",
            cfg.target_group_sparsity, K, plan.num_groups, max_prunable)
    if K > 0 and plan.schedule.joint_steps == 0:
        logger.warning("QASSO: the joint stage has 0 steps, so no unit will be pruned "
                       "(target K=%d)", K)
    elif 0 < plan.schedule.joint_steps < cfg.pruning_periods:
        logger.warning("QASSO: the joint stage has %d steps < pruning_periods=%d; using %d "
                       "one-step periods", plan.schedule.joint_steps, cfg.pruning_periods,
                       plan.pruning_periods)


def grads_finite(param_groups) -> bool:
    """Whether every gradient is finite, from one sum per tensor and one host sync.

    A sum is NaN or +-Inf when any element is (Inf - Inf gives NaN); finite values would have to
    total ~3e38 to overflow. Cheaper than a max-norm (one read, no abs)."""
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    dev = grads[0].device
    total = torch.stack([t.sum(dtype=torch.float32).to(dev) for t in grads]).sum()
    return bool(torch.isfinite(total))
