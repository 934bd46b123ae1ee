"""The one seam for model specifics (`geta_hf.registry`): what the HF integration registers, and
a layer type registered from outside the core is quantized like the built-in ones."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import geta_hf
from geta_hf import GETAConfig, registry
from geta_hf.hf import QuantConv1D
from geta_hf.quant import QuantLayerMixin, QuantLinear, quant_layers


class TransposedLinear(nn.Module):
    """A linear layer storing its weight ``(in, out)``, as a new architecture might."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class QuantTransposedLinear(QuantLayerMixin, TransposedLinear):
    weight_out_dim = 1

    @classmethod
    def from_float(cls, layer, *, nonlinear=True, quantize_input=False):
        return cls.wrap(layer, ("n_in", "n_out"), nonlinear=nonlinear,
                        quantize_input=quantize_input)

    def forward(self, x):
        x, w = self._quant_inputs(x)
        return x @ w + self.bias


@pytest.fixture
def transposed_registered():
    entry = registry.register_linear_type(TransposedLinear, QuantTransposedLinear,
                                          weight_out_dim=1, in_attr="n_in", out_attr="n_out")
    yield entry
    registry._LINEAR_TYPES.pop(TransposedLinear)


def test_the_hf_integration_registers_transformers_specifics():
    assert registry.float_linear_types()[:2] == (nn.Linear, Conv1D)
    assert registry.linear_type_of(Conv1D(8, 4)).quant_cls is QuantConv1D
    assert registry.linear_type_of(nn.Linear(4, 8)).quant_cls is QuantLinear
    # a subclass of nn.Linear is an nn.Linear (the most derived registration wins)
    assert registry.linear_type_of(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 8)
                                   ).float_cls is nn.Linear
    assert registry.linear_type_of(nn.Embedding(4, 8)) is None
    names = registry.shape_attribute_names()
    assert {"num_heads", "num_key_value_heads", "split_size", "num_key_value_groups"} <= names
    assert registry.linear_type_of(Conv1D(8, 4)).io((4, 8)) == (4, 8)  # Conv1D: (in, out)


def test_forward_defaults_only_where_the_forward_accepts_them():
    class WithCache(nn.Module):
        def forward(self, x, use_cache=True):
            return x

    assert registry.forward_defaults(WithCache()) == {"use_cache": False}
    assert registry.forward_defaults(WithCache(), {"use_cache": True}) == {}
    assert registry.forward_defaults(nn.Linear(2, 2)) == {}


def test_a_registered_layer_type_is_quantized(transposed_registered):
    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    geta_hf.prepare_model(model, GETAConfig(weight_bits=(8, 8)))
    layers = dict(quant_layers(model))
    assert isinstance(layers["0"], QuantTransposedLinear) and isinstance(layers["2"], QuantLinear)
    q = layers["0"]
    assert q.weight is model[0].weight
    expected = x @ q.weight_quantizer(q.weight) + q.bias
    torch.testing.assert_close(model[0](x), expected)
    assert not torch.equal(model[0](x), x @ q.weight + q.bias)  # the weight is quantized


def test_registration_errors_name_the_class():
    with pytest.raises(ValueError, match="TransposedLinear.*weight_out_dim must be 0 or 1"):
        registry.register_linear_type(TransposedLinear, QuantTransposedLinear, weight_out_dim=2,
                                      in_attr="n_in", out_attr="n_out")
    with pytest.raises(TypeError, match="must subclass it"):
        registry.register_linear_type(TransposedLinear, QuantLinear, weight_out_dim=1,
                                      in_attr="n_in", out_attr="n_out")
    with pytest.raises(TypeError, match="a tuple of names"):
        registry.register_shape_attributes(query="num_heads")


class _SortedTransposedMLP(nn.Module):
    """A made-up architecture: TransposedLinear layers around an op the analysis does not know
    (``sort`` over the batch)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = TransposedLinear(8, 12), TransposedLinear(12, 3)

    def forward(self, x):
        return self.down(torch.sort(torch.relu(self.up(x)), dim=0).values)


def test_a_made_up_op_and_layer_type_build_and_compress_through_public_registration(
        transposed_registered, monkeypatch):
    """Only the public registration points (``register_linear_type``, ``register_op``): the toy
    model is quantized, analysed, pruned and compressed exactly."""
    import geta_hf.graph.propagate as propagate

    monkeypatch.setattr(propagate, "_REGISTERED", {})  # undo register_op after the test
    geta_hf.register_op(torch.ops.aten.sort, "along_dim")
    torch.manual_seed(0)
    model = _SortedTransposedMLP()
    x = {"x": torch.randn(5, 8)}
    geta_hf.prepare_model(model, GETAConfig(weight_bits=(4, 8)))
    assert {type(m) for _, m in quant_layers(model)} == {QuantTransposedLinear}
    q = geta_hf.build_qadg(model, x)
    assert [(f.kind, f.num_units) for f in q.families] == [("channels", 12)]
    for _, m in quant_layers(model):
        m.weight_quantizer.set_bits(5)
    q.zero_units(model, range(0, 12, 2))
    model.eval()
    with torch.no_grad():
        ref = model(**x)
    geta_hf.compress_model(model, q, example_inputs=x)
    with torch.no_grad():
        out = model(**x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert model.up.out_features == model.down.in_features == 6
