"""Capture a model's forward graph with ``torch.export`` (non-strict), quantizers bypassed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping

import torch
from torch import nn

from ..quant.prepare import quantization_bypassed
from ..registry import forward_defaults

__all__ = ["GraphCaptureError", "CapturedGraph", "capture_graph"]


class GraphCaptureError(ValueError):
    """The model could not be captured or analysed; the message says why and what to do."""


@dataclass
class CapturedGraph:
    """A model captured with ``torch.export``, with its placeholders mapped to parameter names."""

    program: "torch.export.ExportedProgram"
    #: placeholder name -> canonical parameter name (first name in ``model.named_parameters()``)
    param_of: Dict[str, str]
    #: placeholder names of buffers, lifted constants and user inputs
    non_param_inputs: Dict[str, str]


def capture_graph(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> CapturedGraph:
    """Export ``model`` on ``example_inputs`` (a dict of keyword inputs) in eval mode.

    Quantized layers compute in full precision during capture, so the graph, and hence the
    pruning groups, are the same whether or not :func:`geta_hf.prepare_model` was applied.
    The forward defaults registered with :func:`geta_hf.registry.register_forward_default` are
    passed unless the caller set them (the HF integration turns the KV cache off).
    """
    if not isinstance(example_inputs, Mapping):
        raise GraphCaptureError(
            "build_qadg: example_inputs must be a dict of keyword inputs (e.g. one collated batch: "
            f"{{'input_ids': ..., 'attention_mask': ...}}), got {type(example_inputs).__name__}")
    kwargs = dict(example_inputs)
    kwargs.update(forward_defaults(model, kwargs))
    was_training = model.training
    model.eval()
    try:
        with quantization_bypassed(model):
            program = torch.export.export(model, (), kwargs, strict=False)
    except Exception as e:  # torch.export raises many different types
        raise GraphCaptureError(
            f"build_qadg: torch.export could not capture {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check that the "
            "example inputs run through model(**example_inputs) (a model with a KV cache: "
            "turn it off). The pruning search space is derived from this graph.") from e
    finally:
        model.train(was_training)
    canonical = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    state = dict(model.named_parameters(remove_duplicate=False))
    sig = program.graph_signature
    param_of = {}
    for ph, fqn in sig.inputs_to_parameters.items():
        p = state.get(fqn)
        param_of[ph] = canonical.get(id(p), fqn) if p is not None else fqn
    non_param = {}
    for ph, fqn in sig.inputs_to_buffers.items():
        non_param[ph] = f"buffer {fqn}"
    for ph, fqn in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        non_param[ph] = f"constant {fqn}"
    for ph in sig.user_inputs:
        non_param[ph] = f"input {ph}"
    return CapturedGraph(program=program, param_of=param_of, non_param_inputs=non_param)
