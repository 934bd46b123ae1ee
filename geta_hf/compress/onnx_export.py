"""`export_onnx`: a compressed model as an ONNX graph with int8 weights and integer matmuls.

Each `PackedQuantLinear` is exported from its integer codes, never from float copies:

* **integer layers** (``layer.kernel == "int8"``: weight and input codes within int8) become
  ``QuantizeLinear`` (the input quantizer: ``x`` clipped to ``q_m``, or ``sign(x) min(|x|,
  q_m)^t`` for the non-linear one, divided by ``d_x`` and rounded half to even, as in torch; the
  codes are shifted by 128 into uint8, the operand kind x86 integer GEMMs are fastest on) ->
  ``MatMulInteger`` with the int8 weight codes (zero points 128 and 0) -> ``Cast`` -> ``Mul``
  by ``d_x d_W`` -> ``Add`` bias. Standard ONNX ops only (opset 21).
* **other layers** (weight-only, or codes wider than int8) keep an int8/int16 code initializer
  that is cast and scaled in the graph (ONNX Runtime folds that once, when the session loads);
  their input quantizer, if any, is written out with standard ops.

The export uses ``torch.onnx.export(..., dynamo=True)`` (it needs the ``onnx`` and
``onnxscript`` packages: ``pip install geta-hf[onnx]``), with dynamic batch and sequence axes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.functional import EPS, T_MIN
from ..registry import forward_defaults
from ..surgery import set_submodule
from .packed import PackedQuantLinear

__all__ = ["export_onnx", "OnnxExportError"]

_U8_ZERO = 128  # uint8 zero point of the shifted input codes
_LOG_FLOOR = 1e-30  # as in quant.functional
_OPSET = 21  # QuantizeLinear with a 0-dim scale and uint8 zero point; MatMulInteger
_PROTO_LIMIT = 1_800_000_000  # above this many bytes of tensors, weights go to a side file


class OnnxExportError(RuntimeError):
    """The model cannot be exported as asked; the message says why."""


class _OnnxPackedLinear(nn.Module):
    """Export-time stand-in for one `PackedQuantLinear` (same outputs, ONNX-friendly ops)."""

    def __init__(self, layer: PackedQuantLinear) -> None:
        super().__init__()
        self.out_features = layer.out_features
        self.bias = layer.bias
        aq = layer.act_quantizer
        self.act = aq is not None and aq.calibrated and aq.enabled
        self.nonlinear = self.act and aq.t is not None
        state = layer._int_state(layer.weight_packed.device) if (
            layer.integer_kernels and self.act) else None
        self.integer = state is not None
        codes = layer.codes()
        with torch.no_grad():
            if self.act:  # clip and exponent as constants (float32 values, exactly)
                self.register_buffer("d_x", aq.d.detach().clamp_min(EPS).float())
                self.q_m = float(aq.q_m.detach().abs().clamp_min(EPS).float())
                self.t = float(aq.t.detach().clamp_min(T_MIN).float()) if self.nonlinear else 1.0
            if self.integer:
                self.register_buffer("w_codes_t", state.w_codes.t().contiguous())  # (in, out)
                self.register_buffer("scale", torch.tensor(state.scale, dtype=torch.float32))
                self.register_buffer("zp_x", torch.tensor(_U8_ZERO, dtype=torch.uint8))
                self.register_buffer("zp_w", torch.tensor(0, dtype=torch.int8))
            else:
                dtype = torch.int8 if layer.weight_bits <= 8 else torch.int16
                self.register_buffer("w_codes", codes.to(dtype))  # (out, in)
                self.register_buffer("scale", layer.weight_scale.detach().float())

    def _clipped(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clipped to ``q_m`` (linear) or ``sign(x) min(|x|, q_m)^t`` (non-linear)."""
        if not self.nonlinear:
            return torch.clamp(x, -self.q_m, self.q_m)
        u = torch.clamp(x.abs(), _LOG_FLOOR, self.q_m)  # q_m >= EPS > the floor
        return torch.exp(torch.log(u) * self.t) * torch.sign(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        x = x.float()
        if self.integer:
            sym = torch.onnx.ops.symbolic
            u8 = sym("QuantizeLinear", (self._clipped(x), self.d_x, self.zp_x),
                     dtype=torch.uint8, shape=x.shape, version=_OPSET)
            acc = sym("MatMulInteger", (u8, self.w_codes_t, self.zp_x, self.zp_w),
                      dtype=torch.int32, shape=(*x.shape[:-1], self.out_features), version=_OPSET)
            y = acc.to(torch.float32) * self.scale
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(out_dtype)
        if self.act:
            x = torch.round(self._clipped(x) / self.d_x) * self.d_x
        w = self.w_codes.to(torch.float32) * self.scale
        b = None if self.bias is None else self.bias.float()
        return F.linear(x, w, b).to(out_dtype)


def _packed_names(model: nn.Module) -> List[Tuple[str, PackedQuantLinear]]:
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, PackedQuantLinear)]


@contextlib.contextmanager
def _export_layers(model: nn.Module) -> Iterator[Dict[str, str]]:
    """Swap every `PackedQuantLinear` for its export stand-in; restore them (and the mode) after.

    Yields ``{layer name: "int8" | "float"}``.
    """
    layers = _packed_names(model)
    was_training = model.training
    swapped: List[Tuple[str, PackedQuantLinear]] = []
    try:
        model.eval()
        plan = {}
        for name, layer in layers:
            new = _OnnxPackedLinear(layer)
            plan[name] = "int8" if new.integer else "float"
            set_submodule(model, name, new)
            swapped.append((name, layer))
        yield plan
    finally:
        for name, layer in swapped:
            set_submodule(model, name, layer)
        model.train(was_training)


class _Flat(nn.Module):
    """Calls ``model(**dict(zip(names, tensors)), **constants)``; returns the output tensors."""

    def __init__(self, model: nn.Module, names: Sequence[str], constants: Mapping[str, Any],
                 output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names, self.constants, self.output_names = list(names), dict(constants), output_names

    def forward(self, *tensors: torch.Tensor):
        out = self.model(**dict(zip(self.names, tensors)), **self.constants)
        return tuple(out[k] for k in self.output_names)


def _output_names(model: nn.Module, inputs: Mapping[str, Any]) -> List[str]:
    with torch.no_grad():
        out = model(**inputs)
    if not isinstance(out, Mapping):
        raise OnnxExportError(f"export_onnx: expected the model to return a dict-like output "
                              f"(a transformers ModelOutput), got {type(out).__name__}")
    names = [k for k, v in out.items() if torch.is_tensor(v)]
    if not names:
        raise OnnxExportError("export_onnx: the model returned no tensor outputs")
    return names


def _split_inputs(example_inputs: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if not isinstance(example_inputs, Mapping):
        raise TypeError("export_onnx: example_inputs must be a dict of model keyword arguments "
                        f"(e.g. a tokenizer's output), got {type(example_inputs).__name__}")
    tensors = {k: v for k, v in example_inputs.items() if torch.is_tensor(v)}
    constants = {k: v for k, v in example_inputs.items() if not torch.is_tensor(v)}
    if not tensors:
        raise ValueError("export_onnx: example_inputs holds no tensor")
    return tensors, constants


def _dynamic_shapes(tensors: Mapping[str, torch.Tensor]):
    """Batch (dim 0) for every input; sequence (dim 1) for 2-D integer inputs (token ids, masks)."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    spec = []
    for v in tensors.values():
        axes = {0: batch} if v.dim() >= 1 else {}
        if v.dim() == 2 and not v.is_floating_point():
            axes[1] = seq
        spec.append(axes)
    return {"tensors": tuple(spec)}


def _widen(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Sizes 1 are specialised by torch.export: trace batch and sequence at >= 2."""
    out = {}
    for k, v in tensors.items():
        if v.dim() >= 1 and v.shape[0] == 1:
            v = v.expand(2, *v.shape[1:])
        if v.dim() == 2 and not v.is_floating_point() and v.shape[1] == 1:
            v = v.expand(v.shape[0], 2)
        out[k] = v.contiguous()
    return out


def _keep_weights(node) -> Optional[bool]:
    """onnxscript folding rule: never fold a node that reads a weight matrix (an initializer of
    rank >= 2 other than int64 ids). Folding would store a second copy in the file: float
    weights from the integer codes, or a transposed tied embedding. Default rules otherwise."""
    for v in node.inputs:
        if v is not None and v.is_initializer() and v.shape is not None and len(v.shape) >= 2 \
                and v.dtype is not None and v.dtype.name != "INT64":
            return False
    return None


def _finish(program) -> None:
    """Optimize the exported graph (constant folding, CSE) without folding the weight codes,
    and drop the exporter's per-node debug metadata (source stack traces)."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(program.model, should_fold=_keep_weights)
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()


def _move_in(tmp: str, folder: str, graph: str) -> None:
    """Move the exported files from ``tmp`` into ``folder``: the weights file (if any, which
    did not exist before) first, the graph last, so ``folder`` never holds a graph whose
    weights file is missing; if the graph cannot be moved, the moved weights file is removed."""
    sides = [n for n in sorted(os.listdir(tmp)) if n != graph]
    moved = []
    try:
        for name in sides:
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
            moved.append(os.path.join(folder, name))
        os.replace(os.path.join(tmp, graph), os.path.join(folder, graph))
    except BaseException:
        for p in moved:
            os.unlink(p)
        raise


@torch.no_grad()
def export_onnx(model: nn.Module, path: str | os.PathLike,
                example_inputs: Mapping[str, Any]) -> Dict[str, str]:
    """Write ``model`` (compressed by :func:`geta_hf.compress_model`) to the ONNX file ``path``.

    ``example_inputs`` are keyword arguments for the model (a tokenizer's output, plus constants;
    the forward defaults registered with :func:`geta_hf.registry.register_forward_default` are
    added, e.g. the HF integration's KV-cache switch); every tensor becomes a graph input with a
    dynamic batch axis, and 2-D integer inputs (token ids, masks) also a dynamic sequence axis. The graph outputs are
    the tensors of the model's output, named as there (``start_logits``, ``logits``, ...).
    Quantized layers are written from their integer codes (see the module docstring). Models
    whose tensors exceed ~1.8 GB put them in ``<path>.data`` beside the file.

    Returns ``{layer name: "int8" | "float"}``: how each quantized layer was exported.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError("export_onnx needs the onnx and onnxscript packages: "
                          "pip install 'geta-hf[onnx]'") from e
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"export_onnx: path {path!r} is a folder; give a file name (model.onnx)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"export_onnx: folder {folder!r} does not exist")
    tensors, constants = _split_inputs(example_inputs)
    # registered defaults (transformers: no KV-cache outputs, one forward over the sequence)
    constants.update(forward_defaults(model, {**tensors, **constants}))
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    external = nbytes > _PROTO_LIMIT
    side = path + ".data"
    if external and os.path.exists(side):
        raise FileExistsError(f"export_onnx: {side!r} exists; the weights would be written there")
    tensors = _widen(tensors)
    with _export_layers(model) as plan:
        out_names = _output_names(model, {**tensors, **constants})
        flat = _Flat(model, list(tensors), constants, out_names).eval()
        tmp = tempfile.mkdtemp(prefix=".geta-onnx-", dir=folder)
        try:
            tmp_file = os.path.join(tmp, os.path.basename(path))
            with warnings.catch_warnings():  # shared batch/sequence axes: expected, not news
                warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
                program = torch.onnx.export(
                    flat, tuple(tensors.values()), dynamo=True, optimize=False, verbose=False,
                    dynamic_shapes=_dynamic_shapes(tensors), input_names=list(tensors),
                    output_names=out_names, opset_version=_OPSET)
            _finish(program)
            program.save(tmp_file, external_data=external)
            _move_in(tmp, folder, os.path.basename(path))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return plan
