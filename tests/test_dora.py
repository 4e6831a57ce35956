"""DoRA (lorafit.variants.dora) against plain matrix math and against the real `peft`.

The math: W' = m * (W0 + s B A) / ||W0 + s B A||_c, per output feature. PEFT: adapters with random
factors and a random magnitude move between the two libraries in both directions with the same
logits (within 1e-5; measured differences are about 1e-7), merged models agree, and one training step
gives the same loss and gradients.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

peft = pytest.importorskip("peft")

from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama  # noqa: E402
from lorafit import BASE_ADAPTER, LoraConfig, LoraModel, LorafitError, get_lora_model  # noqa: E402
from lorafit import fast  # noqa: E402
from test_interop import _quiet, logits, logits_mixed, randomise_  # noqa: E402
from test_layers import Toy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ATOL = 1e-5
GRAD = {"rtol": 1e-4, "atol": 1e-6}

CASES = {
    "llama-qv": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-embedding": (tiny_llama, dict(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                    target_modules=["embed_tokens", "q_proj", "k_proj", "v_proj",
                                                                    "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                    fan_in_fan_out=True)),
    "bert-seqcls": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["query", "value"])),
}


def ours(case: str, seed: int = 0, **extra):
    build, kwargs = CASES[case]
    model = get_lora_model(build(seed), LoraConfig(**kwargs, use_dora=True, **extra))
    randomise_(model)
    return model


def theirs(case: str, seed: int = 0, **extra):
    build, kwargs = CASES[case]
    with _quiet():
        model = peft.get_peft_model(build(seed), peft.LoraConfig(**kwargs, use_dora=True, **extra))
    randomise_(model)
    return model


def batch_for(model) -> dict[str, torch.Tensor]:
    batch = make_batch(vocab=100, batch=3, seq=10)
    batch["attention_mask"][2, 7:] = 0
    return batch


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- the layer against the equation ----------------------------------------------------------------------
def dora_layer(base: nn.Module, **config):
    lora = get_lora_model(Toy(base), LoraConfig(target_modules=["proj"], r=3, lora_alpha=6, use_dora=True,
                                                init_lora_weights=False, **config))
    layer = lora.model.proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].uniform_(0.5, 2.0)
    return lora, layer


def _adapted_weight(weight_out_in: torch.Tensor, layer) -> torch.Tensor:
    """W' = m (W0 + s B A) / ||W0 + s B A||, rows being output features: the paper's equation by hand."""
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    direction = weight_out_in + 2.0 * (B @ A)
    m = layer.lora_magnitude_vector["default"].detach()
    return m[:, None] * direction / direction.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_linear_and_conv1d_equal_the_equation(kind):
    torch.manual_seed(0)
    base = nn.Linear(10, 6) if kind == "linear" else Conv1D(6, 10)
    weight = (base.weight.T if kind == "conv1d" else base.weight).detach().clone()  # (out, in)
    bias = base.bias.detach().clone()
    lora, layer = dora_layer(base)
    assert tuple(layer.lora_magnitude_vector["default"].shape) == (6,)
    x = torch.randn(4, 5, 10)
    expected = x @ _adapted_weight(weight, layer).T + bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert max_diff(layer(x), x @ weight.T + bias) > 1e-2  # not a no-op
        lora.merge_adapter()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        lora.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight.T if kind == "conv1d" else weight,
                               rtol=0, atol=1e-6)


def test_embedding_equals_the_equation():
    torch.manual_seed(0)
    base = nn.Embedding(12, 6)
    weight = base.weight.detach().clone()  # (num, dim): an output feature is a column
    lora, layer = dora_layer(base)
    A, B = layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach()
    direction = weight + 2.0 * (B @ A).T
    m = layer.lora_magnitude_vector["default"].detach()
    assert m.shape == (6,)
    ids = torch.tensor([[0, 3, 11], [5, 5, 1]])
    expected = (m * direction / direction.norm(dim=0))[ids]
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), expected)
        lora.merge_adapter()
        torch.testing.assert_close(layer(ids), expected)


def test_a_fresh_adapter_changes_nothing_and_its_magnitude_is_the_weight_norm():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    lora = get_lora_model(Toy(base), LoraConfig(target_modules=["proj"], use_dora=True))
    torch.testing.assert_close(lora.model.proj.lora_magnitude_vector["default"].detach(),
                               base.weight.detach().norm(dim=1))
    x = torch.randn(3, 10)
    torch.testing.assert_close(lora.model(x), base(x))


def test_gradients_treat_the_norm_as_a_constant():
    """Section 4.3 of the paper, and PEFT: n = ||W0 + s B A|| is detached, so m, A and B get the gradients of
    h = m (W0 + s B A) x / n with n held fixed; autograd on that equation, written out here, is the reference."""
    torch.manual_seed(0)
    lora, layer = dora_layer(nn.Linear(10, 6, bias=False))
    x = torch.randn(7, 10)
    layer(x).square().sum().backward()
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_()
    direction = layer.base_layer.weight.detach() + 2.0 * (B @ A)
    (x @ (m[:, None] * direction / direction.norm(dim=1, keepdim=True).detach()).T).square().sum().backward()
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].grad, m.grad)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad)
    assert layer.base_layer.weight.grad is None


def test_safe_merge_refuses_non_finite_and_leaves_the_layer_as_it_was():
    lora, layer = dora_layer(nn.Linear(10, 6))
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(LorafitError, match="NaN or inf"):
        lora.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


# --- PEFT: files both ways ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_a_lorafit_dora_adapter_loads_in_peft(case, tmp_path):
    model = ours(case)
    batch = batch_for(model)
    model.save_pretrained(tmp_path)
    expected = logits(model, batch)
    build, _ = CASES[case]
    assert max_diff(logits(build(0), batch), expected) > 1e-3, "adapter is a no-op: test is void"
    with _quiet():
        loaded = peft.PeftModel.from_pretrained(build(0), str(tmp_path))
    assert max_diff(logits(loaded, batch), expected) <= ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_a_peft_dora_adapter_loads_in_lorafit(case, tmp_path):
    model = theirs(case)
    batch = batch_for(model)
    model.save_pretrained(tmp_path)
    expected = logits(model, batch)
    build, _ = CASES[case]
    loaded = LoraModel.from_pretrained(build(0), tmp_path)
    assert loaded.peft_config["default"].use_dora is True
    assert max_diff(logits(loaded, batch), expected) <= ATOL
    # and lorafit writes back the same file, key for key and value for value
    loaded.save_pretrained(tmp_path / "again")
    theirs_file, ours_file = load_file(str(tmp_path / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(ours_file) == sorted(theirs_file)
    assert any(key.endswith(".lora_magnitude_vector") for key in ours_file)
    for key in theirs_file:
        assert torch.equal(ours_file[key], theirs_file[key]), key


@pytest.mark.parametrize("case", ["llama-all-linear-embedding", "gpt2-conv1d"])
def test_merged_models_equal_peft_merged_and_the_unmerged_adapter(case, tmp_path):
    model = theirs(case)
    batch = batch_for(model)
    model.save_pretrained(tmp_path)
    unmerged = logits(model, batch)
    build, _ = CASES[case]
    loaded = LoraModel.from_pretrained(build(0), tmp_path)
    ours_merged = loaded.merge_and_unload()
    theirs_merged = model.merge_and_unload()
    assert max_diff(logits(ours_merged, batch), logits(theirs_merged, batch)) <= ATOL
    assert max_diff(logits(ours_merged, batch), unmerged) <= ATOL


def test_merging_adapters_in_turn_gives_peft_weights_and_unmerging_restores_the_base():
    """Each DoRA adapter's norm comes from the weight without the ones merged before it (PEFT 0.21's rule)."""
    mine, other = ours("llama-qv"), theirs("llama-qv")
    extra = dict(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    mine.add_adapter("plain", LoraConfig(**extra))
    mine.add_adapter("dora2", LoraConfig(**extra, use_dora=True))
    with _quiet():
        other.add_adapter("plain", peft.LoraConfig(**extra))
        other.add_adapter("dora2", peft.LoraConfig(**extra, use_dora=True))
    for model in (mine, other):
        randomise_(model, seed=3, all_lora=True)
    # same tensors in both: copy ours into theirs by PEFT's parameter names
    theirs_params = dict(other.named_parameters())
    with torch.no_grad():
        for name, param in mine.named_parameters():
            if ".lora_" in name:
                peft_name = "base_model.model." + name.removeprefix("model.")
                if "lora_magnitude_vector" in name:
                    peft_name += ".weight"
                theirs_params[peft_name].copy_(param)
    layer = mine.model.model.layers[0].self_attn.q_proj
    base = layer.base_layer.weight.detach().clone()
    mine.merge_adapter(["default", "plain", "dora2"])
    other.base_model.merge_adapter(["default", "plain", "dora2"])
    peft_weight = other.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(layer.base_layer.weight, peft_weight, rtol=0, atol=ATOL)
    assert max_diff(layer.base_layer.weight, base) > 1e-3
    mine.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.detach(), base, rtol=0, atol=ATOL)


# --- PEFT: one training step ----------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "dropout"), [("llama-qv", 0.0), ("gpt2-conv1d", 0.0), ("llama-qv", 0.3)])
def test_one_training_step_gives_peft_loss_and_gradients(case, dropout):
    """With dropout, PEFT runs W0 on the dropped input again; the same masks come from the same seed on
    lorafit's plain path (torch's own dropout)."""
    mine, other = ours(case, lora_dropout=dropout), theirs(case, lora_dropout=dropout)
    fast.use_fast_paths(mine, False)
    batch = batch_for(mine)
    batch["labels"] = batch["input_ids"]
    results = []
    for model, prefix in ((mine, "model."), (other, "base_model.model.")):
        model.train()
        torch.manual_seed(11)
        loss = model(**batch).loss
        loss.backward()
        grads = {_common_name(name.removeprefix(prefix)): p.grad for name, p in model.named_parameters()
                 if p.grad is not None}
        results.append((loss.detach(), grads))
    (my_loss, my_grads), (their_loss, their_grads) = results
    torch.testing.assert_close(my_loss, their_loss, rtol=1e-6, atol=1e-6)
    assert sorted(my_grads) == sorted(their_grads)
    assert any("lora_magnitude_vector" in name for name in my_grads)
    for name in my_grads:
        torch.testing.assert_close(my_grads[name], their_grads[name], **GRAD, msg=name)


def _common_name(name: str) -> str:
    """A parameter's name without the adapter's; PEFT's magnitude is lora_magnitude_vector.default.weight,
    ours lora_magnitude_vector.default (its file key has no .weight either)."""
    name = name.replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


# --- mixed batches --------------------------------------------------------------------------------------
def test_mixed_batch_rows_equal_each_adapter_alone():
    """PEFT 0.21 refuses adapter_names with DoRA ("Cannot pass `adapter_names` when DoRA is enabled"), so the
    reference is each row run alone with its adapter; a DoRA adapter, a plain one and the base share the batch."""
    loaded = ours("llama-all-linear-embedding")
    loaded.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    names = ["default", BASE_ADAPTER, "plain", "default"]
    batch = make_batch(vocab=100, batch=len(names), seq=8)
    for fast_on in (True, False):
        fast.use_fast_paths(loaded, fast_on)
        mixed = logits_mixed(loaded, batch, names)
        for row, name in enumerate(names):
            single = {k: v[row:row + 1] for k, v in batch.items()}
            if name == BASE_ADAPTER:
                with loaded.disable_adapter():
                    alone = logits(loaded, single)
            else:
                loaded.set_adapter(name)
                alone = logits(loaded, single)
            assert max_diff(mixed[row:row + 1], alone) <= ATOL, (fast_on, name)


# --- configuration --------------------------------------------------------------------------------------
def test_use_dora_is_written_as_peft_writes_it_and_checked():
    assert LoraConfig(use_dora=True).to_peft_dict()["use_dora"] is True
    assert LoraConfig().to_peft_dict()["use_dora"] is False
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(use_dora="yes")
