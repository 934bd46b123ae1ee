"""GETA on a PEFT (LoRA) model: the base model is compressed, the adapters are trained.

With ``GETATrainer(model=peft_model)`` (a ``peft.PeftModel`` whose adapter is LoRA):

* **Quantizers.** Every base linear layer is quantized, frozen or not (the base is frozen
  because LoRA trains the adapters, not because it should stay float). A LoRA-wrapped layer
  quantizes its *merged* weight ``W + s B A`` (:attr:`QuantLayerMixin.weight_delta`), and its
  wrapper's forward is the base layer's alone; so merging the adapter after training keeps the
  fake-quantized model exact, and ``save_compressed`` writes one packed model. LoRA dropout is
  therefore not applied (a warning says so). The adapter matrices themselves are never
  quantized.
* **Search space.** The graph is captured without the adapters, so the units are the base
  model's heads and channels (adapter ranks are never units; ``modules_to_save`` copies add
  nothing). Each unit also owns the matching rows of ``lora_B`` (its output rows); the input
  columns of ``lora_A`` are removed with the unit's consumers. Zeroing a unit's base rows and
  ``lora_B`` rows zeroes its rows of the merged weight exactly.
* **Saliency.** The pruning scores see what is trained and what is held: the frozen base rows
  contribute their magnitude, the ``lora_B`` rows their magnitude and their gradient (or update);
  the frozen base rows have no gradient.
* **Checkpoints.** peft saves the adapters only, but GETA also changes the base model: the
  quantizer scalars and the rows of units being forgotten or removed. :func:`save_base_state`
  writes those tensors to ``geta_base_state.safetensors`` beside the adapter in every
  checkpoint; resuming loads them back (:func:`load_base_state`), so a resumed run continues
  exactly.
* **Result.** :func:`merged_base_model` merges the adapters into the base weights (peft's
  ``merge_and_unload``) and returns the plain transformers model, which the trainer compresses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import types
import os
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..config import GETAConfig
from ..graph.qadg import QADG, Member
from ..quant.layers import QuantLayerMixin, quant_layers
from ..registry import float_linear_types, linear_type_of

__all__ = ["is_peft_model", "lora_layers", "check_supported", "run_config", "attach_adapters",
           "adapter_members", "merged_base_model", "BASE_STATE", "base_state", "save_base_state",
           "load_base_state"]

logger = logging.getLogger(__name__)


def _lora_layer_cls():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no model can be a peft model
        return None
    return LoraLayer


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (or holds peft tuner layers)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, wrapper)`` of every LoRA-wrapped layer of ``model``."""
    cls = _lora_layer_cls()
    return [] if cls is None else [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _active_adapter(wrapper) -> str:
    active = list(wrapper.active_adapters)
    return active[0] if active else ""


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the module and the setting, a PEFT model GETA cannot compress."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cls = _lora_layer_cls()
    others = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, BaseTunerLayer) and not isinstance(m, cls)})
    if others:
        raise ValueError(f"GETATrainer: PEFT adapters of type {', '.join(others)} are not supported; "
                         "use LoRA (peft.LoraConfig)")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("GETATrainer: the PEFT model has no LoRA layer")
    float_types = float_linear_types()
    for name, w in layers:
        active = list(w.active_adapters)
        if len(active) != 1:
            raise ValueError(f"GETATrainer: {name} has {len(active)} active adapters "
                             f"({active}); activate exactly one (model.set_adapter(name))")
        a = active[0]
        base = w.get_base_layer()
        if not isinstance(base, float_types):
            raise ValueError(f"GETATrainer: LoRA on {name} ({type(base).__name__}) is not "
                             f"supported; GETA compresses {', '.join(t.__name__ for t in float_types)} "
                             "layers (target_modules)")
        if a not in w.lora_A:
            raise ValueError(f"GETATrainer: {name}: adapter {a!r} is not a LoRA linear adapter")
        if w.use_dora.get(a, False):
            raise ValueError(f"GETATrainer: {name}: DoRA (use_dora=True) is not supported; "
                             "use plain LoRA")
        if getattr(w, "lora_bias", {}).get(a, False):
            raise ValueError(f"GETATrainer: {name}: lora_bias=True is not supported")
        if w.merged:
            raise ValueError(f"GETATrainer: {name}: the adapter is merged; unmerge it first")


def run_config(cfg: GETAConfig, model: nn.Module) -> GETAConfig:
    """The config GETA runs a PEFT model with: the base model's frozen layers are compressed
    (``compress_frozen``), the adapter matrices and ``modules_to_save`` originals are not
    quantized. ``cfg`` itself is unchanged."""
    names = [n for n, _ in model.named_modules()]
    extra = [p for p in ("*.lora_A.*", "*.lora_B.*", "*.original_module", "*.original_module.*")
             if any(fnmatch.fnmatchcase(n, p) for n in names) and p not in cfg.exclude_modules]
    logger.info("geta_hf: PEFT model: GETA compresses the frozen base layers (compress_frozen="
                "True for this run) and leaves %s unquantized; the given GETAConfig is unchanged",
                ", ".join(extra) or "no adapter module")
    return dataclasses.replace(cfg, compress_frozen=True,
                               exclude_modules=tuple(cfg.exclude_modules) + tuple(extra))


class _LoraDelta:
    """``s B A`` of one wrapper's active adapter (peft's own ``get_delta_weight``), or None when
    the adapter is disabled; a plain object, so it is not registered as a submodule."""

    def __init__(self, wrapper: nn.Module, adapter: str) -> None:
        self.wrapper, self.adapter = wrapper, adapter

    def __call__(self):
        w = self.wrapper
        if w.disable_adapters or w.merged or self.adapter not in w.active_adapters:
            return None
        return w.get_delta_weight(self.adapter)


def _base_forward(self, x, *args, **kwargs):
    """A LoRA wrapper's forward under GETA: the base layer, which quantizes ``W + s B A``."""
    return self.base_layer(x, *args, **kwargs)


def attach_adapters(model: nn.Module) -> int:
    """Fold each LoRA adapter into its (prepared) base layer's quantized weight; returns the
    number of wrappers changed. Call after :func:`geta_hf.prepare_model`."""
    n = 0
    dropped = []
    for name, w in lora_layers(model):
        base = w.get_base_layer()
        if not isinstance(base, QuantLayerMixin):
            continue  # excluded from quantization: peft's own forward stays
        a = _active_adapter(w)
        base.weight_delta = _LoraDelta(w, a)
        w.forward = types.MethodType(_base_forward, w)
        if not isinstance(w.lora_dropout[a], nn.Identity):
            dropped.append(name)
        n += 1
    if dropped:
        logger.warning("GETATrainer: lora_dropout is not applied on %d LoRA layer(s) (%s%s): GETA "
                       "quantizes the merged weight W + s B A, which has no separate adapter input",
                       len(dropped), ", ".join(dropped[:3]), " ..." if len(dropped) > 3 else "")
    return n


def adapter_members(qadg: QADG, model: nn.Module) -> QADG:
    """``qadg`` with the LoRA matrices of each unit added: ``lora_B`` rows to the members of the
    unit's producer layers, ``lora_A`` columns to its consumers."""
    by_weight = {}
    for name, w in lora_layers(model):
        base = w.get_base_layer()
        if isinstance(base, QuantLayerMixin) and base.weight_delta is not None:
            a = base.weight_delta.adapter
            kind = linear_type_of(base)
            by_weight[name + ".base_layer.weight"] = (name, a, kind.weight_out_dim,
                                                      w.lora_A[a].weight, w.lora_B[a].weight)
    families, added = [], []
    for f in qadg.families:
        members, consumers = list(f.members), list(f.consumers)
        for m in f.members:
            hit = by_weight.get(m.param)
            if hit is not None and m.dim == hit[2]:
                b = hit[4]
                members.append(Member(f"{hit[0]}.lora_B.{hit[1]}.weight", 0, m.index, "out",
                                      int(b.shape[0]), b.numel()))
                added.append(members[-1].param)
        for m in f.consumers:
            hit = by_weight.get(m.param)
            if hit is not None and m.dim == 1 - hit[2]:
                a_w = hit[3]
                consumers.append(Member(f"{hit[0]}.lora_A.{hit[1]}.weight", 1, m.index, "in",
                                        int(a_w.shape[1]), a_w.numel()))
                added.append(consumers[-1].param)
        families.append(dataclasses.replace(f, members=members, consumers=consumers))
    return QADG(families, qadg.unprunable, qadg.model_name, qadg.unknown_ops,
                known_params=list(qadg.known_params) + added, timings=qadg.timings)


def merged_base_model(model: nn.Module) -> nn.Module:
    """Merge the LoRA adapters of ``model`` (prepared by GETA; changed in place) into the base
    weights and return the plain transformers model: a ``PeftModel`` through peft's
    ``merge_and_unload``; a transformers model with adapters (``model.add_adapter``) by merging
    each wrapper and putting its base layer (or its trained ``modules_to_save`` copy) back."""
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper

    from ..surgery import set_submodule

    for _, w in lora_layers(model):
        base = w.get_base_layer()
        if isinstance(base, QuantLayerMixin):
            base.weight_delta = None
        w.__dict__.pop("forward", None)
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    for name, w in lora_layers(model):
        w.merge()
        set_submodule(model, name, w.get_base_layer())
    for name, w in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
        set_submodule(model, name, w.modules_to_save[w.active_adapter] if w.active_adapter in
                      w.modules_to_save else w.original_module)
    return model


#: the file, beside peft's adapter in a checkpoint, that holds GETA's changes to the base model
BASE_STATE = "geta_base_state.safetensors"


def base_state(model: nn.Module, qadg: QADG) -> Dict[str, torch.Tensor]:
    """The base-model tensors GETA trains or edits that peft's adapter file lacks: every
    quantizer's scalars and every frozen parameter of a pruning group member."""
    params = dict(model.named_parameters())
    out = {}
    for f in qadg.families:
        for m in f.members:
            p = params[m.param]
            if not p.requires_grad:
                out[m.param] = p
    for name, layer in quant_layers(model):
        for qname in ("weight_quantizer", "act_quantizer"):
            q = getattr(layer, qname)
            if q is not None:
                for k, t in q.state_dict(keep_vars=True).items():
                    out[f"{name}.{qname}.{k}"] = t
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_base_state(model: nn.Module, qadg: QADG, folder: str) -> str:
    """Write :func:`base_state` to ``folder/geta_base_state.safetensors`` (returns the path)."""
    from safetensors.torch import save_file

    path = os.path.join(folder, BASE_STATE)
    save_file(base_state(model, qadg), path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return path


@torch.no_grad()
def load_base_state(model: nn.Module, qadg: QADG, folder: str) -> None:
    """Load ``folder/geta_base_state.safetensors`` into ``model`` (checked: every tensor of
    :func:`base_state` present with its shape; ``ValueError`` naming the first that is not)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, BASE_STATE)
    if not os.path.isfile(path):
        raise ValueError(f"GETATrainer: checkpoint {folder!r} has no {BASE_STATE}: a PEFT "
                         "checkpoint written by GETATrainer holds the base model's quantizers and "
                         "pruned rows there; without it the run cannot resume")
    saved = load_file(path)
    live = {}
    params = dict(model.named_parameters())
    for k in base_state(model, qadg):
        live[k] = params.get(k)
        if live[k] is None:
            owner, _, leaf = k.rpartition(".")
            live[k] = getattr(model.get_submodule(owner), leaf)
    for k, t in live.items():
        if k not in saved or tuple(saved[k].shape) != tuple(t.shape):
            raise ValueError(f"GETATrainer: {path}: tensor {k!r} is missing or has another shape "
                             f"(expected {tuple(t.shape)}); it was written for another model")
    for k, t in live.items():
        t.copy_(saved[k].to(device=t.device, dtype=t.dtype))
