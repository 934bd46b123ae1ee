"""`model_stats`: parameters, MACs, BOPs, weight size and bit widths, per layer and in total.

Definitions (method §4.2-4.4, with the §6.1.8 fixes):

* **MACs** are counted from the ops that actually run on ``example_inputs``: matrix products
  (linear layers, and attention score ``QK^T`` and context ``AV`` products, whether they run as
  ``matmul`` or inside scaled-dot-product attention) and convolutions. Element-wise ops, norms,
  softmax and embedding lookups count 0.
* **BOPs** = sum over MAC-carrying ops of ``MACs x b_w x b_a``: ``b_w`` is the layer's weight bit
  width (32 if not quantized) and ``b_a`` its input bit width (32 if inputs are not quantized).
  Attention products multiply two float activations, so they count at 32 x 32.
* **Weight size** = sum of ``numel x bits`` over all weights (quantized weights at their bit width,
  everything else, quantizer scalars included, at the width of its dtype).
* Relative figures compare with the dense fp32 model (``reference``), whose BOPs are
  ``MACs x 32 x 32`` -- no manual rescaling by the initial bit width is needed.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..quant.layers import QuantLayerMixin
from .packed import PackedQuantLinear

__all__ = ["model_stats", "layer_bits"]

aten = torch.ops.aten
_SDPA = {getattr(aten, n) for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable",
) if hasattr(aten, n)}

_CONV = {getattr(aten, n) for n in ("convolution", "_convolution") if hasattr(aten, n)}


def _numel(shape) -> int:
    return int(math.prod(int(s) for s in shape))


def _op_macs(func, args, out) -> int:
    pk = getattr(func, "overloadpacket", None)
    if pk in (aten.mm, aten.addmm, aten._int_mm):  # _int_mm: the integer kernel path
        a, b = (args[0], args[1]) if pk is not aten.addmm else (args[1], args[2])
        return _numel(a.shape) * int(b.shape[-1])
    if pk in (aten.bmm, aten.baddbmm):
        a, b = (args[0], args[1]) if pk is aten.bmm else (args[1], args[2])
        return _numel(a.shape) * int(b.shape[-1])
    if pk in _SDPA or func in _SDPA:
        q, k, v = args[0], args[1], args[2]
        batch_heads_l = _numel(q.shape[:-1])  # (..., Hq, L)
        s = int(k.shape[-2])
        return batch_heads_l * s * (int(q.shape[-1]) + int(v.shape[-1]))
    if pk in _CONV:
        w = args[1]  # (out, in / groups, *kernel): one MAC per output element per kernel tap
        return _numel(out.shape) * (int(w.shape[1]) * _numel(w.shape[2:]))
    return 0


class _MacCounter(TorchDispatchMode):
    """Counts MACs per innermost running module (maintained by global module hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: List[nn.Module] = []
        self.macs: Dict[int, int] = defaultdict(int)
        self.kinds: Dict[int, set] = defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        n = _op_macs(func, args, out)
        if n:
            key = id(self.stack[-1]) if self.stack else 0
            self.macs[key] += n
            pk = getattr(func, "overloadpacket", None)
            self.kinds[key].add("attention" if (pk in _SDPA or func in _SDPA or
                                                pk in (aten.bmm, aten.baddbmm)) else "linear")
        return out


def layer_bits(mod: nn.Module) -> Dict[str, Optional[int]]:
    """``{"weight": bits, "act": bits}`` of a layer (32 where not quantized)."""
    wb, ab = 32, 32
    if isinstance(mod, PackedQuantLinear):
        wb = int(mod.weight_bits)
    elif isinstance(mod, QuantLayerMixin):
        wb = int(round(float(mod.weight_quantizer.bits())))
    aq = getattr(mod, "act_quantizer", None)
    if aq is not None and getattr(aq, "calibrated", False):
        ab = int(round(float(aq.bits())))
    return {"weight": wb, "act": ab}


def _quantized_weights(model: nn.Module) -> Dict[int, int]:
    """id(weight tensor) -> bits for every quantized weight."""
    out = {}
    for mod in model.modules():
        if isinstance(mod, PackedQuantLinear):
            out[id(mod.weight_packed)] = int(mod.weight_bits)
        elif isinstance(mod, QuantLayerMixin):
            out[id(mod.weight)] = int(round(float(mod.weight_quantizer.bits())))
    return out


def _count_macs(model: nn.Module, inputs: Mapping[str, Any]) -> _MacCounter:
    counter = _MacCounter()

    def pre(mod, _args):
        counter.stack.append(mod)

    def post(mod, _args, _out):
        if counter.stack and counter.stack[-1] is mod:
            counter.stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return counter


def _dense_reference(model: nn.Module) -> Optional[nn.Module]:
    """The dense, unquantized architecture of ``model`` (from its unchanged ``config``).

    Built on the meta device and materialised without initialisation; only its buffers
    (position ids, rotary frequencies, ...) are copied from ``model``: weights are never read
    for counting, so their values do not matter.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    try:
        with torch.device("meta"):
            ref = type(model)(copy.deepcopy(cfg))
        ref = ref.to_empty(device=next(model.parameters()).device)
        own = dict(model.named_buffers())
        for name, buf in ref.named_buffers():
            src = own.get(name)
            if src is not None and src.shape == buf.shape:
                buf.copy_(src)
    except Exception:  # noqa: BLE001 - an exotic constructor: no automatic reference
        return None
    return ref.eval()


def _stats(model: nn.Module, inputs: Mapping[str, Any]) -> Dict[str, Any]:
    counter = _count_macs(model, inputs)
    names = {id(m): n for n, m in model.named_modules()}
    mods = {id(m): m for m in model.modules()}
    qweights = _quantized_weights(model)
    layers = []
    total_macs = total_bops = 0
    for key, macs in counter.macs.items():
        mod = mods.get(key)
        name = names.get(key, "<model>")
        bits = layer_bits(mod) if mod is not None else {"weight": 32, "act": 32}
        kinds = counter.kinds[key]
        if "linear" not in kinds:  # activation x activation products
            bits = {"weight": 32, "act": 32}
        own = 0
        if mod is not None:
            own = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, PackedQuantLinear):
                own += mod.in_features * mod.out_features
        bops = macs * bits["weight"] * bits["act"]
        layers.append({"name": name, "kind": "attention" if "linear" not in kinds else "linear",
                       "weight_bits": bits["weight"], "act_bits": bits["act"], "params": own,
                       "macs": macs, "bops": bops})
        total_macs += macs
        total_bops += bops
    params = size_bits = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        params += n
        bits = qweights.get(id(p))
        if bits is None:
            bits = torch.finfo(p.dtype).bits if p.is_floating_point() else torch.iinfo(p.dtype).bits
        size_bits += n * bits
    for m in model.modules():  # packed weights: out x in codes at their bit width
        if isinstance(m, PackedQuantLinear):
            n = m.in_features * m.out_features
            params += n
            size_bits += n * m.weight_bits
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    layers.sort(key=lambda r: order.get(r["name"], -1))
    qlayers = [r for r in layers if r["kind"] == "linear"]
    return {
        "params": params,
        "macs": total_macs,
        "bops": total_bops,
        "size_bits": size_bits,
        "avg_weight_bits": size_bits / params if params else 0.0,
        "avg_layer_weight_bits": (sum(r["weight_bits"] * r["params"] for r in qlayers)
                                  / max(1, sum(r["params"] for r in qlayers))),
        "layers": layers,
    }


@torch.no_grad()
def model_stats(model: nn.Module, example_inputs: Mapping[str, Any],
                reference: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Parameters, MACs, BOPs, weight size and bit widths of ``model`` on ``example_inputs``.

    Returns ``{params, macs, bops, size_bits, avg_weight_bits, layers: [{name, kind, weight_bits,
    act_bits, params, macs, bops}, ...], reference: {...}, relative: {params, macs, bops, size}}``.
    ``reference`` is the dense fp32 model to compare with; by default the dense architecture of
    ``model.config`` is instantiated without initialising its weights.
    """
    if not isinstance(example_inputs, Mapping):
        raise TypeError("model_stats: example_inputs must be a dict of keyword inputs")
    out = _stats(model, example_inputs)
    ref_model = reference if reference is not None else _dense_reference(model)
    if ref_model is not None:
        ref = _stats(ref_model, example_inputs)
        # the reference is the dense model in fp32, whatever quantizers it may hold
        ref_bops = ref["macs"] * 32 * 32
        ref_size = ref["params"] * 32
        out["reference"] = {"params": ref["params"], "macs": ref["macs"], "bops": ref_bops,
                            "size_bits": ref_size}
        out["relative"] = {
            "params": out["params"] / ref["params"],
            "macs": out["macs"] / ref["macs"] if ref["macs"] else float("nan"),
            "bops": out["bops"] / ref_bops if ref_bops else float("nan"),
            "size": out["size_bits"] / ref_size,
        }
    return out
