"""ONNX export of compressed models: int8 initializers, integer matmuls, onnxruntime outputs."""

import os
from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch

import geta_hf
from geta_hf.compress import PackedQuantLinear, export_onnx, use_integer_kernels

from test_int_inference import (compress_minilm, compress_tiny, minilm_batch, outputs,
                                packed_layers)
from tiny_models import _text_inputs


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, inputs):
    names = [i.name for i in sess.get_inputs()]
    return [torch.from_numpy(o) for o in sess.run(None, {k: inputs[k].numpy() for k in names})]


def float_bytes(model):
    """Bytes of the float tensors a compressed model holds outside its integer codes."""
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
               if t.is_floating_point())


def check_graph(path, model, plan):
    g = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in g.node)
    n_int = sum(v == "int8" for v in plan.values())
    assert ops["MatMulInteger"] == n_int and (n_int == 0 or ops["QuantizeLinear"] >= 1)
    kinds = Counter()
    for init in g.initializer:
        kinds[onnx.TensorProto.DataType.Name(init.data_type)] += len(init.raw_data) or (
            4 * len(init.float_data))
    # no float copy of any quantized weight: the graph holds at most the model's float tensors
    assert kinds["FLOAT"] <= float_bytes(model) + 1024
    codes = sum(m.in_features * m.out_features for m in packed_layers(model))
    assert kinds["INT8"] + kinds["INT16"] >= codes
    return ops


@pytest.mark.parametrize("quantizer,act_bits", [("linear", (8,)), ("nonlinear", (4, 6, 8, 10))],
                         ids=["linear-a8", "nonlinear-mixed"])
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_export_runs_in_onnxruntime_and_matches_torch(name, quantizer, act_bits, tmp_path):
    model, make = compress_tiny(name, act_bits=act_bits, quantizer=quantizer)
    path = tmp_path / "m.onnx"
    plan = export_onnx(model, path, make(1))
    assert set(plan) == {n for n, m in model.named_modules() if isinstance(m, PackedQuantLinear)}
    assert {m.kernel for m in packed_layers(model)} == set(plan.values())
    if 10 in act_bits:  # 10-bit inputs do not fit int8: those layers export on the float path
        assert set(plan.values()) == {"int8", "float"}
    check_graph(path, model, plan)
    sess = session(path)
    extra = {} if name == "bert" else {"use_cache": False}
    # other batch sizes and lengths than the example: the axes are dynamic
    for inputs in (make(2), _text_inputs(3, batch=3, seq=7, **extra),
                   _text_inputs(4, batch=1, seq=20, **extra)):
        got, ref = run(sess, inputs), outputs(model, inputs)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()
    # the model is handed back as it was: packed layers, integer kernels, mode
    assert all(isinstance(m, PackedQuantLinear) for m in packed_layers(model))
    assert not model.training and len(packed_layers(model)) == len(plan)


def test_initializer_bytes_within_the_packed_checkpoint(tmp_path):
    model, make = compress_tiny("bert")
    geta_hf.save_compressed(model, str(tmp_path / "c"))
    export_onnx(model, tmp_path / "m.onnx", make(1))
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    init = sum(len(i.raw_data) for i in g.initializer)
    assert init <= 1.2 * os.path.getsize(tmp_path / "c" / "model.safetensors")


def test_switch_exports_the_float_path(tmp_path):
    model, make = compress_tiny("llama")
    with use_integer_kernels(model, False):
        plan = export_onnx(model, tmp_path / "f.onnx", make(1))
    assert set(plan.values()) == {"float"}
    ops = check_graph(tmp_path / "f.onnx", model, plan)
    assert ops["MatMulInteger"] == 0
    for a, b in zip(run(session(tmp_path / "f.onnx"), make(3)), outputs(model, make(3))):
        assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()


def test_bad_arguments_and_failed_exports_leave_nothing_behind(tmp_path, monkeypatch):
    model, make = compress_tiny("bert")
    model.train()
    with pytest.raises(TypeError, match="example_inputs must be a dict"):
        export_onnx(model, tmp_path / "m.onnx", (make(1)["input_ids"],))
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(model, tmp_path, make(1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, tmp_path / "nope" / "m.onnx", make(1))

    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(model, tmp_path / "m.onnx", make(1))
    assert os.listdir(tmp_path) == []  # no temporary folder, no partial file
    assert model.training and all(isinstance(m, PackedQuantLinear) for m in packed_layers(model))
    assert len(packed_layers(model)) == 13


def test_real_minilm_export(minilm, tmp_path):
    base, tok = minilm
    model, batch = compress_minilm(base, tok)
    geta_hf.save_compressed(model, str(tmp_path / "c"))
    plan = export_onnx(model, tmp_path / "m.onnx", batch)
    assert set(plan.values()) == {"int8"}
    check_graph(tmp_path / "m.onnx", model, plan)
    # the float embeddings are inside the safetensors file too
    assert os.path.getsize(tmp_path / "m.onnx") <= 1.2 * os.path.getsize(
        tmp_path / "c" / "model.safetensors")
    other = minilm_batch(tok, n=2, length=40)
    keep = other["attention_mask"].bool()  # rows 1 and 2 end in padding
    assert not keep.all()
    got, ref = run(session(tmp_path / "m.onnx"), other), outputs(model, other)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        # Every position the attention mask keeps matches to float rounding (5e-7 measured):
        # the input codes agree there, so the integer accumulations are identical. Padding
        # positions (which no QA post-processing reads) are left out: their hidden states are
        # degenerate and an input code can flip there, also between torch's own int and float
        # paths.
        assert (a - b).abs()[keep].max().item() <= 1e-3 * b.abs()[keep].max().item()


def test_large_models_write_their_weights_beside_the_file(tmp_path, monkeypatch):
    from geta_hf.compress import onnx_export

    monkeypatch.setattr(onnx_export, "_PROTO_LIMIT", 0)  # pretend the model is > 1.8 GB
    model, make = compress_tiny("gpt2")
    (tmp_path / "taken.onnx.data").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="taken.onnx.data"):
        export_onnx(model, tmp_path / "taken.onnx", make(1))
    assert (tmp_path / "taken.onnx.data").read_bytes() == b"user data"
    export_onnx(model, tmp_path / "m.onnx", make(1))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "taken.onnx.data"]
    for a, b in zip(run(session(tmp_path / "m.onnx"), make(2)), outputs(model, make(2))):
        assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()
    # the weights file moves in first and the graph last: when the graph cannot be moved, the
    # weights file is taken back, so no graph ever points at a missing or stale weights file
    real_replace = os.replace

    def fail_on_graph(src, dst):
        if str(dst).endswith("g.onnx"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_graph)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, tmp_path / "g.onnx", make(1))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "taken.onnx.data"]
