"""LoRA layers against plain matrix math: h = W0 x + (alpha / r) * B A x, for Linear, Conv1D and Embedding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import make_batch, tiny_bert_cls, tiny_llama
from lorafit import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear, LoraModel, LorafitError, get_lora_model
from lorafit.fast.dropout import FastDropout
from lorafit.layers import LAYER_KINDS
from lorafit.serialization import get_peft_model_state_dict, set_peft_model_state_dict



class Toy(nn.Module):
    """One base layer named ``proj`` inside a model, so get_lora_model can target it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _wrapped(layer: nn.Module, **config):
    config.setdefault("target_modules", ["proj"])
    lora = get_lora_model(Toy(layer), LoraConfig(**config))
    return lora, lora.model.proj


def _linear_factors(layer):
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(4, 8, False), (3, 5, False), (4, 8, True), (1, 1, False)])
def test_linear_equals_plain_math(r, alpha, rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    _, layer = _wrapped(base, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False)
    assert isinstance(layer, LoraLinear)
    A, B = _linear_factors(layer)
    assert A.shape == (r, 16) and B.shape == (8, r)
    scaling = alpha / (math.sqrt(r) if rslora else r)
    x = torch.randn(3, 5, 16)
    expected = x @ weight.T + bias + scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # the update really is there (not a test of zeros)
    assert (layer(x) - (x @ weight.T + bias)).abs().max() > 1e-3


def test_conv1d_equals_plain_math():
    """GPT-2's Conv1D stores its weight as (in, out) and computes x @ W + b."""
    torch.manual_seed(0)
    base = Conv1D(8, 16)  # nf=out 8, nx=in 16
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    assert weight.shape == (16, 8)
    _, layer = _wrapped(base, r=4, lora_alpha=6, init_lora_weights=False)
    A, B = _linear_factors(layer)
    assert A.shape == (4, 16) and B.shape == (8, 4)
    x = torch.randn(2, 7, 16)
    expected = x @ weight + bias + 1.5 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_equals_one_hot_math():
    torch.manual_seed(0)
    base = nn.Embedding(20, 8, padding_idx=0)
    weight = base.weight.detach().clone()
    _, layer = _wrapped(base, r=4, lora_alpha=2, init_lora_weights=False)
    assert isinstance(layer, LoraEmbedding)
    A = layer.lora_embedding_A["default"].detach()
    B = layer.lora_embedding_B["default"].detach()
    assert A.shape == (4, 20) and B.shape == (8, 4)
    ids = torch.tensor([[0, 3, 19, 3], [5, 5, 1, 2]])
    one_hot = F.one_hot(ids, 20).float()
    expected = one_hot @ weight + 0.5 * (one_hot @ A.T @ B.T)
    torch.testing.assert_close(layer(ids), expected, rtol=1e-5, atol=1e-5)


def test_linear_layer_used_directly_equals_math_with_two_adapters():
    """The active adapter alone contributes; switching is just a different A and B."""
    torch.manual_seed(0)
    lora, layer = _wrapped(nn.Linear(10, 6), r=2, lora_alpha=2, init_lora_weights=False)
    lora.add_adapter("other", LoraConfig(target_modules=["proj"], r=5, lora_alpha=10, init_lora_weights=False))
    weight, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x = torch.randn(4, 10)
    for name, scaling in [("default", 1.0), ("other", 2.0), ("default", 1.0)]:
        lora.set_adapter(name)
        A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        torch.testing.assert_close(layer(x), x @ weight.T + bias + scaling * (x @ A.T @ B.T), rtol=1e-5, atol=1e-5)


# --- initialisation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("base_factory", [lambda: nn.Linear(64, 24), lambda: Conv1D(24, 64)])
def test_default_init_b_zero_a_kaiming_uniform(base_factory):
    torch.manual_seed(0)
    base = base_factory()
    _, layer = _wrapped(base, r=8)
    A, B = _linear_factors(layer)
    assert torch.count_nonzero(B) == 0
    assert torch.count_nonzero(A) == A.numel()
    # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_features = 64
    bound = 1 / math.sqrt(64)
    assert A.abs().max() <= bound + 1e-7
    assert A.abs().max() > 0.9 * bound  # spread over the whole interval, not a tiny normal
    assert A.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # a fresh adapter changes nothing


def test_gaussian_init_a_std_is_one_over_r():
    torch.manual_seed(0)
    r = 4
    _, layer = _wrapped(nn.Linear(1024, 8), r=r, init_lora_weights="gaussian")
    A, B = _linear_factors(layer)
    assert torch.count_nonzero(B) == 0
    assert A.std().item() == pytest.approx(1 / r, rel=0.05)
    assert A.mean().abs().item() < 0.05 / r
    assert A.abs().max() > 2 / r  # normal tails, not a uniform in [-1/sqrt(in), 1/sqrt(in)]


def test_init_false_makes_both_factors_random():
    torch.manual_seed(0)
    _, layer = _wrapped(nn.Linear(16, 8), r=4, init_lora_weights=False)
    A, B = _linear_factors(layer)
    assert torch.count_nonzero(A) == A.numel() and torch.count_nonzero(B) == B.numel()
    x = torch.randn(2, 16)
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_embedding_init_keeps_the_update_zero():
    torch.manual_seed(0)
    _, layer = _wrapped(nn.Embedding(30, 8), r=4)
    A = layer.lora_embedding_A["default"].detach()
    B = layer.lora_embedding_B["default"].detach()
    assert torch.count_nonzero(A) == 0 and torch.count_nonzero(B) == B.numel()
    ids = torch.randint(0, 30, (2, 5))
    assert torch.equal(layer(ids), layer.base_layer(ids))


def test_init_matches_peft_convention_on_a_model():
    """Same model, same config: PEFT's factors are zero exactly where ours are."""
    import peft

    from conftest import tiny_gpt2

    kwargs = dict(r=4, target_modules=["c_attn", "wte"], init_lora_weights="gaussian")
    ours = get_lora_model(tiny_gpt2(), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**kwargs))
    our_state = {k.replace(".default", ""): v for k, v in ours.model.state_dict().items() if "lora_" in k}
    their_state = {k.removeprefix("base_model.model.").replace(".default", ""): v
                   for k, v in theirs.state_dict().items() if "lora_" in k}
    assert our_state.keys() == their_state.keys()
    for key in our_state:
        assert our_state[key].shape == their_state[key].shape, key
        assert bool(torch.count_nonzero(our_state[key])) == bool(torch.count_nonzero(their_state[key])), key


# --- what trains --------------------------------------------------------------------------------------
def test_base_frozen_and_only_lora_gets_gradients():
    model = tiny_bert_cls()
    lora = get_lora_model(model, LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    lora.train()
    for name, param in lora.named_parameters():
        assert param.requires_grad == (".lora_" in name), name
    batch = make_batch(batch=2)
    out = lora(**batch, labels=torch.tensor([0, 1]))
    out.loss.backward()
    with_grad = {name for name, p in lora.named_parameters() if p.grad is not None}
    lora_params = {name for name, _ in lora.named_parameters() if ".lora_" in name}
    assert with_grad == lora_params
    assert len(lora_params) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert all(lora.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def test_gradients_of_lora_factors_match_plain_math():
    torch.manual_seed(0)
    _, layer = _wrapped(nn.Linear(6, 5), r=3, lora_alpha=6, init_lora_weights=False)
    A_ref, B_ref = (t.clone().requires_grad_(True) for t in _linear_factors(layer))
    x = torch.randn(4, 6)
    layer(x).pow(2).sum().backward()
    base = layer.base_layer
    (x @ base.weight.detach().T + base.bias.detach() + 2 * (x @ A_ref.T @ B_ref.T)).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A_ref.grad)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B_ref.grad)
    assert base.weight.grad is None and not base.weight.requires_grad


# --- dropout ------------------------------------------------------------------------------------------
def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    lora, layer = _wrapped(nn.Linear(32, 16), r=4, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False)
    lora.train()
    base = layer.base_layer
    A, B = _linear_factors(layer)
    x = torch.randn(8, 32)
    base_out = x @ base.weight.detach().T + base.bias.detach()

    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = FastDropout(0.5).train()(x)
    torch.testing.assert_close(out, base_out + dropped @ A.T @ B.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, base_out + x @ A.T @ B.T, atol=1e-3)  # dropout did act on the LoRA branch

    # with the LoRA branch silenced the base path is exactly the undropped base output
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    for _ in range(3):
        torch.testing.assert_close(layer(x), base_out, rtol=1e-6, atol=1e-6)

    # eval: no dropout at all
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(B)
    lora.eval()
    torch.testing.assert_close(layer(x), base_out + x @ A.T @ B.T, rtol=1e-5, atol=1e-5)


# --- half-precision bases -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_adapter(dtype):
    torch.manual_seed(0)
    base32 = nn.Linear(32, 16)
    weight, bias = base32.weight.detach().clone(), base32.bias.detach().clone()
    _, layer = _wrapped(base32.to(dtype), r=4, lora_alpha=8, init_lora_weights=False)
    A, B = _linear_factors(layer)
    assert A.dtype == torch.float32 and B.dtype == torch.float32
    assert layer.base_layer.weight.dtype == dtype
    x = torch.randn(5, 32)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    expected = x @ weight.T + bias + 2 * (x @ A.T @ B.T)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embedding_and_model(dtype):
    model = tiny_llama().to(dtype)
    lora = get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                            init_lora_weights=False))
    layers = [m for m in lora.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 5
    for name, param in lora.named_parameters():
        assert param.dtype == (torch.float32 if ".lora_" in name else dtype), name
    batch = make_batch(batch=2)
    logits = lora(**batch).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_scaled_embedding_scales_the_update_too():
    """Gemma's embedding multiplies its lookup by embed_scale: h = s * (W0 + (alpha / r) * (B A)^T)[ids], so
    the unmerged layer equals the merged one."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    base = Gemma3TextScaledWordEmbedding(20, 6, padding_idx=0, embed_scale=6 ** 0.5)
    lora, layer = _wrapped(base, r=2, lora_alpha=4, init_lora_weights=False)
    ids = torch.tensor([[1, 5, 19, 0]])
    A, B = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    expected = 6 ** 0.5 * (base.weight.detach() + 2 * (B @ A).T)[ids]
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), expected)
        lora.merge_adapter()
        torch.testing.assert_close(layer(ids), expected)


# --- what an adapter is made of -----------------------------------------------------------------------
@pytest.mark.parametrize(("base_factory", "shapes"), [
    (lambda: nn.Linear(10, 6), {"lora_A.weight": (3, 10), "lora_B.weight": (6, 3)}),
    (lambda: Conv1D(6, 10), {"lora_A.weight": (3, 10), "lora_B.weight": (6, 3)}),  # nf=out 6, nx=in 10
    (lambda: nn.Embedding(12, 6), {"lora_embedding_A": (3, 12), "lora_embedding_B": (6, 3)}),
])
def test_each_layer_kind_declares_its_adapters_tensors(base_factory, shapes):
    base = base_factory()
    _, layer = _wrapped(base, r=3)
    assert type(layer).adapter_shapes(base, 3) == shapes
    tensors = layer.adapter_tensors("default")
    assert {key: tuple(t.shape) for key, t in tensors.items()} == shapes
    # the declared tensors are exactly the layer's own parameters, none left out
    own = [p for name, p in layer.named_parameters() if not name.startswith("base_layer.")]
    assert sorted(map(id, own)) == sorted(map(id, tensors.values()))


class MagnitudeLinear(LoraLinear):
    """A test-only LoRA variant: one extra vector per adapter (as DoRA's magnitude); it only declares it."""

    def __init__(self, base_layer, routing, fan_in_fan_out=False):
        super().__init__(base_layer, routing, fan_in_fan_out)
        self.lora_magnitude = nn.ParameterDict()

    @classmethod
    def adapter_shapes(cls, base_layer, r, fan_in_fan_out=False):
        shapes = super().adapter_shapes(base_layer, r, fan_in_fan_out)
        return {**shapes, "lora_magnitude": shapes["lora_B.weight"][:1]}

    def add_adapter(self, name, *args):
        super().add_adapter(name, *args)
        self.lora_magnitude[name] = nn.Parameter(torch.ones(self.out_features))


def test_a_variant_with_an_extra_tensor_saves_loads_counts_and_deletes_it(tmp_path, monkeypatch):
    monkeypatch.setitem(LAYER_KINDS, nn.Linear, MagnitudeLinear)
    torch.manual_seed(0)
    lora, layer = _wrapped(nn.Linear(10, 6), r=2)
    assert isinstance(layer, MagnitudeLinear)
    assert lora.get_nb_trainable_parameters()[0] == 2 * 10 + 6 * 2 + 6  # A, B and the magnitude
    with torch.no_grad():
        layer.lora_magnitude["default"].copy_(torch.rand(6))
    lora.save_pretrained(tmp_path)

    loaded = LoraModel.from_pretrained(Toy(nn.Linear(10, 6)), tmp_path, is_trainable=True)
    torch.testing.assert_close(loaded.model.proj.lora_magnitude["default"], layer.lora_magnitude["default"])
    assert loaded.get_nb_trainable_parameters()[0] == 2 * 10 + 6 * 2 + 6
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == [f"base_model.model.proj.{key}" for key in ("lora_A.weight", "lora_B.weight",
                                                                        "lora_magnitude")]
    del state["base_model.model.proj.lora_magnitude"]
    with pytest.raises(LorafitError, match="proj.lora_magnitude"):
        set_peft_model_state_dict(loaded, state)

    loaded.add_adapter("other", LoraConfig(target_modules=["proj"], r=3))
    assert not loaded.model.proj.lora_magnitude["other"].requires_grad  # frozen: "default" is the active one
    assert loaded.model.proj.lora_magnitude["default"].requires_grad
    loaded.set_requires_grad("other")
    assert loaded.model.proj.lora_magnitude["other"].requires_grad
    loaded.delete_adapter("other")
    assert list(loaded.model.proj.lora_magnitude) == ["default"]


def test_layer_safe_merge_checks_every_adapter_before_merging_any():
    lora, layer = _wrapped(nn.Linear(10, 6), init_lora_weights=False)
    lora.add_adapter("bad", LoraConfig(target_modules=["proj"], init_lora_weights=False))
    with torch.no_grad():
        layer.lora_B["bad"].weight[0, 0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(LorafitError, match="NaN or inf"):
        layer.merge(["default", "bad"], safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


def test_same_seed_same_initial_factors_as_peft():
    """Each layer draws its initial factors as PEFT does (an embedding's B twice), so a seed gives PEFT's adapter and
    leaves the generator where PEFT leaves it (add_weighted_adapter's DARE masks are drawn after such a draw)."""
    peft = pytest.importorskip("peft")
    for init in (True, "gaussian"):
        kwargs = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=init)
        ours_base, theirs_base = tiny_llama(0), tiny_llama(0)
        torch.manual_seed(5)
        ours = dict(get_lora_model(ours_base, LoraConfig(**kwargs)).named_parameters())
        after_ours = torch.rand(3)
        torch.manual_seed(5)
        theirs = dict(peft.get_peft_model(theirs_base, peft.LoraConfig(**kwargs)).named_parameters())
        after_theirs = torch.rand(3)
        lora = [name for name in ours if ".lora_" in name]
        assert len(lora) == 6 and all(torch.equal(ours[name], theirs[f"base_model.{name}"]) for name in lora)
        assert torch.equal(after_ours, after_theirs)
