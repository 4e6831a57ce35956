"""LoraModel: merging, unloading, many adapters, disable_adapter, mixed-adapter batches and generation."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama
from lorafit import BASE_ADAPTER, LoraConfig, LoraLayer, LoraModel, LorafitError, get_lora_model
from lorafit.saved_modules import ModulesToSave


MODELS = {
    # (builder, config): Linear layers plus a saved head; Conv1D; Linear plus an Embedding
    "bert-linear": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "dense"])),
    "gpt2-conv1d": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "llama-embedding": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=1, target_modules=["embed_tokens", "q_proj", "down_proj"])),
}


def _randomize_heads(lora: LoraModel, seed: int) -> None:
    """Saved head copies start equal to the original; make them differ so tests can tell them apart."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def _lora(key: str, seed: int = 0, adapter: str = "default", **overrides) -> LoraModel:
    builder, config = MODELS[key]
    torch.manual_seed(seed + 100)
    lora = get_lora_model(builder(), LoraConfig(**{**config, "init_lora_weights": False, **overrides}), adapter)
    _randomize_heads(lora, seed)
    return lora.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lorafit_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]


def _base_weights(lora: LoraModel) -> dict[str, torch.Tensor]:
    """The base model's own parameters (everything that is not an adapter's), under their plain names."""
    return {n.replace(".base_layer", "").replace(".original_module", ""): p for n, p in lora.model.named_parameters()
            if ".lora_" not in n and ".modules_to_save." not in n}


# --- merging --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(MODELS))
def test_merged_output_equals_unmerged(key):
    lora = _lora(key)
    batch = make_batch()
    before = _logits(lora, batch)
    lora.merge_adapter()
    assert all(layer.merged for layer in lora.modules() if isinstance(layer, LoraLayer))
    torch.testing.assert_close(_logits(lora, batch), before, rtol=1e-5, atol=1e-5)
    # and the merged result is W0 + scaling * B A, computed by hand
    fresh = dict(MODELS[key][0]().named_parameters())
    for path, layer in lora.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        w0 = fresh[f"{path}.weight"]
        if hasattr(layer, "lora_A"):
            delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            delta = delta.T if isinstance(layer.base_layer, Conv1D) else delta
        else:
            delta = layer.scaling["default"] * (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T
        torch.testing.assert_close(layer.base_layer.weight.detach(), w0 + delta.detach(), rtol=1e-6, atol=1e-6)
    assert (before - _logits(MODELS[key][0](), batch)).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("key", list(MODELS))
def test_merge_twice_is_a_no_op_and_unmerge_restores(key):
    lora = _lora(key)
    original = _state(lora)
    lora.merge_adapter()
    once = _state(lora)
    assert any(not torch.equal(once[k], original[k]) for k in original)
    lora.merge_adapter()
    lora.merge_adapter(["default"])
    for k, v in _state(lora).items():
        assert torch.equal(v, once[k]), k
    lora.unmerge_adapter()
    assert not any(layer.merged for layer in lora.modules() if isinstance(layer, LoraLayer))
    for k, v in _state(lora).items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6, msg=k)
    lora.unmerge_adapter()  # nothing merged: nothing changes
    for k, v in _state(lora).items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("key", list(MODELS))
def test_merge_and_unload_returns_plain_model(key):
    builder = MODELS[key][0]
    lora = _lora(key)
    batch = make_batch()
    before = _logits(lora, batch)
    plain = lora.merge_and_unload()
    assert type(plain) is type(builder())
    assert _lorafit_modules(plain) == []
    fresh_keys = list(builder().state_dict())
    assert list(plain.state_dict()) == fresh_keys
    torch.testing.assert_close(_logits(plain, batch), before, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_matches_peft(tmp_path):
    lora = _lora("bert-linear")
    lora.save_pretrained(tmp_path)
    ours = lora.merge_and_unload().state_dict()
    theirs = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path).merge_and_unload().state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-6, msg=k)


def test_unload_returns_the_original_model():
    lora = _lora("bert-linear")
    batch = make_batch()
    lora.merge_adapter()  # unload must also take merged updates back out
    base = lora.unload()
    assert _lorafit_modules(base) == []
    fresh = tiny_bert_cls()
    assert list(base.state_dict()) == list(fresh.state_dict())
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(base.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    torch.testing.assert_close(_logits(base, batch), _logits(fresh, batch), rtol=1e-5, atol=1e-5)


def test_unload_without_merge_is_exact():
    lora = _lora("gpt2-conv1d")
    base = lora.unload()
    fresh = tiny_gpt2()
    batch = make_batch()
    assert torch.equal(_logits(base, batch), _logits(fresh, batch))
    for k, v in fresh.state_dict().items():
        assert torch.equal(base.state_dict()[k], v), k


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_with_nan_changes_nothing(call):
    lora = _lora("bert-linear")
    layers = [m for m in lora.model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        layers[-1].lora_B["default"].weight[0, 0] = float("nan")  # the last layer, so others would merge first
    before = _state(lora)
    with pytest.raises(ValueError, match="NaN"):
        getattr(lora, call)(safe_merge=True)
    after = _state(lora)
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert not any(layer.merged for layer in layers)
    assert _lorafit_modules(lora.model)  # still wrapped


def test_safe_merge_without_nan_merges():
    lora = _lora("bert-linear")
    batch = make_batch()
    before = _logits(lora, batch)
    plain = lora.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(_logits(plain, batch), before, rtol=1e-5, atol=1e-5)


def test_disable_adapter_while_merged_gives_base_then_merged_again():
    lora = _lora("llama-embedding")
    batch = make_batch()
    base = _logits(tiny_llama(), batch)
    adapted = _logits(lora, batch)
    lora.merge_adapter()
    with lora.disable_adapter():
        torch.testing.assert_close(_logits(lora, batch), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(lora, batch), adapted, rtol=1e-5, atol=1e-5)
    assert all(m.merged for m in lora.modules() if isinstance(m, LoraLayer))


# --- many adapters --------------------------------------------------------------------------------------
def _two_adapters(key: str = "bert-linear") -> LoraModel:
    lora = _lora(key, seed=0, adapter="a")
    builder, config = MODELS[key]
    torch.manual_seed(1234)
    lora.add_adapter("b", LoraConfig(**{**config, "r": 2, "lora_alpha": 3, "init_lora_weights": False,
                                        "target_modules": ["query", "key"] if key == "bert-linear" else config["target_modules"]}))
    _randomize_heads(lora, 99)
    return lora.eval()


def _only(lora: LoraModel, name: str) -> LoraModel:
    """A fresh base with just adapter ``name``, its tensors copied from ``lora``."""
    builder = MODELS["bert-linear"][0]
    single = get_lora_model(builder(), lora.peft_config[name], name).eval()
    with torch.no_grad():
        copied = 0
        for param_name, param in single.named_parameters():
            if ".lora_" in param_name or ".modules_to_save." in param_name:
                param.copy_(lora.get_parameter(param_name))
                copied += 1
    assert copied
    return single


def test_add_set_delete_and_active_adapter():
    lora = _two_adapters()
    assert lora.active_adapter == "a" and lora.active_adapters == ["a"]
    assert list(lora.peft_config) == ["a", "b"]
    lora.set_adapter("b")
    assert lora.active_adapter == "b"
    for layer in lora.modules():
        if isinstance(layer, (LoraLayer, ModulesToSave)):
            assert layer.active_adapter == "b"
    lora.delete_adapter("b")
    assert lora.active_adapter == "a" and list(lora.peft_config) == ["a"]
    assert not any(".b." in n for n, _ in lora.named_parameters())
    with pytest.raises(LorafitError, match="b"):
        lora.set_adapter("b")
    with pytest.raises(LorafitError, match="already exists"):
        lora.add_adapter("a", LoraConfig(target_modules=["query"]))
    with pytest.raises(LorafitError, match="reserved"):
        lora.add_adapter(BASE_ADAPTER, LoraConfig(target_modules=["query"]))


def test_outputs_switch_and_match_single_adapter_models():
    lora = _two_adapters()
    batch = make_batch()
    only_a, only_b = _only(lora, "a"), _only(lora, "b")
    out_a = _logits(lora, batch)
    lora.set_adapter("b")
    out_b = _logits(lora, batch)
    assert (out_a - out_b).abs().max() > 1e-3
    torch.testing.assert_close(out_a, _logits(only_a, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b, _logits(only_b, batch), rtol=1e-5, atol=1e-5)
    lora.set_adapter("a")
    torch.testing.assert_close(_logits(lora, batch), out_a, rtol=0, atol=0)


def test_set_adapter_trains_only_that_adapter():
    lora = _two_adapters()
    for active in ("a", "b", "a"):
        if active != lora.active_adapter:
            lora.set_adapter(active)
        trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
        assert trainable and all(f".{active}." in n for n in trainable)
        assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)


def test_adding_an_adapter_keeps_it_frozen_until_set():
    lora = _lora("bert-linear", adapter="a")
    trainable_before = {n for n, p in lora.named_parameters() if p.requires_grad}
    lora.add_adapter("b", LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == trainable_before
    assert lora.active_adapter == "a"


def test_bias_modes_follow_the_active_adapter():
    lora = get_lora_model(tiny_bert_cls(), LoraConfig(target_modules=["query"], bias="all"), "a")

    def trainable_base():
        return {n for n, p in lora.model.named_parameters() if p.requires_grad and ".lora_" not in n}

    all_biases = {n for n, _ in lora.model.named_parameters() if n.endswith(".bias")}
    assert len(all_biases) == sum(n.endswith(".bias") for n, _ in tiny_bert_cls().named_parameters())
    assert trainable_base() == all_biases
    lora.add_adapter("b", LoraConfig(target_modules=["query"]))
    assert trainable_base() == all_biases  # "a" is still the one training
    lora.set_adapter("b")
    assert trainable_base() == set()  # bias="none": no bias trains, whatever "a" set
    lora.add_adapter("c", LoraConfig(target_modules=["query", "value"], bias="lora_only"))
    lora.set_adapter("c")
    assert trainable_base() == {f"bert.encoder.layer.{i}.attention.self.{m}.base_layer.bias"
                                for i in range(2) for m in ("query", "value")}
    lora.set_adapter("a")
    assert trainable_base() == {n for n, _ in lora.model.named_parameters() if n.endswith(".bias")}


def test_disable_adapter_gives_exactly_the_base_outputs():
    lora = _two_adapters()
    batch = make_batch()
    base = _logits(tiny_bert_cls(), batch)
    adapted = _logits(lora, batch)
    with lora.disable_adapter():
        assert torch.equal(_logits(lora, batch), base)
    assert torch.equal(_logits(lora, batch), adapted)
    lora.set_adapter("b")
    with lora.disable_adapter():
        assert torch.equal(_logits(lora, batch), base)


def test_switching_never_copies_or_touches_base_weights():
    lora = _two_adapters()
    batch = make_batch(batch=2)
    base = _base_weights(lora)
    assert len(base) > 20
    pointers = {n: p.data_ptr() for n, p in base.items()}
    checksums = {n: p.detach().double().sum().item() for n, p in base.items()}
    copies = {n: p.detach().clone() for n, p in base.items()}
    for i in range(12):
        lora.set_adapter("ab"[i % 2])
        _logits(lora, batch)
        if i % 4 == 0:
            with lora.disable_adapter():
                _logits(lora, batch)
        if i % 3 == 0:
            _logits_mixed(lora, batch, ["a", "b"])
    after = _base_weights(lora)
    assert after.keys() == base.keys()
    for n, p in after.items():
        assert p.data_ptr() == pointers[n], n
        assert p.detach().double().sum().item() == checksums[n], n
        assert torch.equal(p, copies[n]), n


def test_delete_active_adapter_falls_back_and_last_delete_gives_base():
    lora = _two_adapters()
    batch = make_batch()
    only_b = _only(lora, "b")
    lora.delete_adapter("a")
    assert lora.active_adapter == "b"
    torch.testing.assert_close(_logits(lora, batch), _logits(only_b, batch), rtol=1e-5, atol=1e-5)
    lora.delete_adapter("b")
    assert lora.active_adapter is None and lora.peft_config == {}
    assert torch.equal(_logits(lora, batch), _logits(tiny_bert_cls(), batch))


def test_delete_merged_adapter_unmerges_it():
    lora = _two_adapters()
    original = {n: p.detach().clone() for n, p in _base_weights(lora).items()}
    lora.merge_adapter(["a"])
    lora.delete_adapter("a")
    for n, p in _base_weights(lora).items():
        torch.testing.assert_close(p, original[n], rtol=0, atol=1e-6, msg=n)


def test_delete_one_of_two_merged_adapters_keeps_the_other_merged():
    lora = _two_adapters()
    only_b = _only(lora, "b")
    only_b.merge_adapter()
    expected = {n: p.detach().clone() for n, p in _base_weights(only_b).items()}
    lora.merge_adapter(["a", "b"])
    lora.delete_adapter("a")
    assert all(m.merged_adapters == ["b"] for m in lora.modules() if isinstance(m, LoraLayer) and "b" in m.r)
    for n, p in _base_weights(lora).items():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-6, msg=n)


def test_load_adapter_of_a_second_saved_adapter(tmp_path):
    lora = _lora("bert-linear", adapter="a")
    lora.train()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    other = _lora("bert-linear", seed=5)
    batch = make_batch()
    expected = _logits(other, batch)
    other.save_pretrained(tmp_path)
    before_a = _logits(lora.eval(), batch)
    lora.load_adapter(tmp_path, "c")
    assert list(lora.peft_config) == ["a", "c"] and lora.active_adapter == "a"
    torch.testing.assert_close(_logits(lora, batch), before_a, rtol=0, atol=0)
    # loading beside the active adapter leaves that one training
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == trainable
    lora.set_adapter("c")
    torch.testing.assert_close(_logits(lora, batch), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in lora.parameters())  # loaded for inference


# --- mixed batches --------------------------------------------------------------------------------------
def _logits_mixed(lora, batch, names):
    with torch.no_grad():
        return lora(**batch, adapter_names=names).logits


def _row_by_row(lora, batch, names):
    rows = []
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if name == BASE_ADAPTER:
            with lora.disable_adapter():
                rows.append(_logits(lora, row))
        else:
            lora.set_adapter(name)
            rows.append(_logits(lora, row))
    return torch.cat(rows)


@pytest.mark.parametrize("key", list(MODELS))
def test_mixed_batch_equals_rows_run_alone(key):
    lora = _two_adapters(key)
    names = ["a", BASE_ADAPTER, "b", "a", "b"]
    batch = make_batch(batch=len(names))
    mixed = _logits_mixed(lora, batch, names)
    reference = _row_by_row(lora, batch, names)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
    # rows really differ by adapter (the test is not passing on identical heads)
    same_row = {k: v[:1].expand(3, *v.shape[1:]) for k, v in batch.items()}
    outs = _logits_mixed(lora, same_row, ["a", "b", BASE_ADAPTER])
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - outs[2]).abs().max() > 1e-3


def test_mixed_batch_with_different_ranks_and_targets():
    lora = _lora("llama-embedding", adapter="r8", r=8)
    torch.manual_seed(3)
    lora.add_adapter("r1", LoraConfig(r=1, lora_alpha=2, target_modules="all-linear", init_lora_weights=False))
    lora.add_adapter("r3", LoraConfig(r=3, lora_alpha=1, target_modules=["embed_tokens"], init_lora_weights=False,
                                      use_rslora=True))
    lora.eval()
    names = ["r1", "r8", BASE_ADAPTER, "r3", "r8", "r1"]
    batch = make_batch(batch=len(names))
    torch.testing.assert_close(_logits_mixed(lora, batch, names), _row_by_row(lora, batch, names),
                               rtol=1e-5, atol=1e-5)


def test_mixed_batch_all_base_equals_disabled():
    lora = _two_adapters()
    batch = make_batch(batch=3)
    torch.testing.assert_close(_logits_mixed(lora, batch, [BASE_ADAPTER] * 3), _logits(tiny_bert_cls(), batch),
                               rtol=1e-6, atol=1e-6)


def test_mixed_batch_leaves_no_routing_behind():
    lora = _two_adapters()
    batch = make_batch(batch=2)
    single = _logits(lora, batch)
    _logits_mixed(lora, batch, ["b", BASE_ADAPTER])
    assert torch.equal(_logits(lora, batch), single)
    with pytest.raises(LorafitError):
        _logits_mixed(lora, batch, ["b"])
    assert torch.equal(_logits(lora, batch), single)


def test_mixed_batch_errors():
    lora = _two_adapters()
    batch = make_batch(batch=3)
    with pytest.raises(LorafitError, match="3 rows"):
        _logits_mixed(lora, batch, ["a", "b"])
    with pytest.raises(LorafitError, match="nope"):
        _logits_mixed(lora, batch, ["a", "nope", "b"])
    lora.train()
    with pytest.raises(LorafitError, match="eval"):
        lora(**batch, adapter_names=["a", "b", "a"])
    lora.eval()
    lora.merge_adapter()
    with pytest.raises(LorafitError, match="merge"):
        _logits_mixed(lora, batch, ["a", "b", "a"])


def test_generate_with_adapter_names_equals_per_row_generation():
    torch.manual_seed(0)
    lora = get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                   init_lora_weights=False), "a")
    lora.add_adapter("b", LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                     init_lora_weights=False))
    lora.eval()
    names = ["b", BASE_ADAPTER, "a", "b"]
    prompts = torch.randint(3, 100, (len(names), 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = lora.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **kwargs)
        rows = []
        for i, name in enumerate(names):
            ids = prompts[i:i + 1]
            if name == BASE_ADAPTER:
                with lora.disable_adapter():
                    rows.append(lora.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs))
            else:
                lora.set_adapter(name)
                rows.append(lora.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs))
    assert mixed.shape == (len(names), 12)
    assert torch.equal(mixed, torch.cat(rows))
    assert len({tuple(r[0, 6:].tolist()) for r in rows}) > 1  # the adapters change what is generated


def test_mixed_batch_sees_factors_changed_after_a_first_mixed_batch(tmp_path):
    """The stacked factors are reused between mixed batches: in-place updates, reloads and re-created
    adapters must all show up in the next one."""
    lora = _two_adapters()
    names = ["a", "b", BASE_ADAPTER]
    batch = make_batch(batch=len(names))
    _logits_mixed(lora, batch, names)
    with torch.no_grad():  # an optimizer step changes factors in place
        for layer in lora.modules():
            if isinstance(layer, LoraLayer) and "b" in layer.r:
                layer.lora_B["b"].weight.mul_(-2)
    torch.testing.assert_close(_logits_mixed(lora, batch, names), _row_by_row(lora, batch, names), rtol=1e-5, atol=1e-5)
    other = _lora("bert-linear", seed=9)
    other.save_pretrained(tmp_path)
    lora.delete_adapter("b")
    lora.load_adapter(tmp_path, "b")
    lora.eval()
    torch.testing.assert_close(_logits_mixed(lora, batch, names), _row_by_row(lora, batch, names), rtol=1e-5, atol=1e-5)


def test_gradients_through_a_mixed_batch_equal_row_by_row():
    lora = _two_adapters()
    names = ["a", "b", "a"]
    batch = make_batch(batch=len(names))

    def train_every_adapter():  # set_adapter freezes the others; here both adapters must learn
        for n, p in lora.named_parameters():
            p.requires_grad_(".lora_" in n)

    def grads(run):
        lora.zero_grad(set_to_none=True)
        train_every_adapter()
        run().sum().backward()
        return {n: p.grad.clone() for n, p in lora.named_parameters() if ".lora_" in n and p.grad is not None}

    mixed = grads(lambda: lora(**batch, adapter_names=names).logits)

    def row_by_row():
        rows = []
        for i, name in enumerate(names):
            lora.set_adapter(name)
            train_every_adapter()
            rows.append(lora(**{k: v[i:i + 1] for k, v in batch.items()}).logits)
        return torch.cat(rows)

    reference = grads(row_by_row)
    assert set(mixed) == set(reference) and any(".b.weight" in n for n in mixed)
    for name in reference:
        torch.testing.assert_close(mixed[name], reference[name], rtol=1e-4, atol=1e-6)


# --- wrapping a base twice; switching while merged ------------------------------------------------------------
@pytest.mark.parametrize("second", ["get_lora_model", "from_pretrained"])
def test_a_second_wrap_of_the_same_base_is_refused_and_keeps_the_first_adapter(second, tmp_path):
    first = _lora("bert-linear")
    _lora("bert-linear", seed=1).save_pretrained(tmp_path)
    before, modules = _state(first), [(n, type(m).__name__) for n, m in first.named_modules()]
    with pytest.raises(LorafitError, match="already holds lorafit adapters.*add_adapter"):
        if second == "get_lora_model":
            get_lora_model(first.model, LoraConfig(**MODELS["bert-linear"][1]))
        else:
            LoraModel.from_pretrained(first.model, tmp_path)
    assert [(n, type(m).__name__) for n, m in first.named_modules()] == modules
    after = _state(first)
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key


def test_failed_get_lora_model_leaves_the_base_as_it_was():
    base = tiny_bert_cls()
    before, modules = _state(base), [(n, type(m).__name__) for n, m in base.named_modules()]
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(LorafitError, match="ranker"):
        get_lora_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["ranker"]))
    assert [(n, type(m).__name__) for n, m in base.named_modules()] == modules
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads and all(grads.values())
    after = _state(base)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_set_adapter_while_another_is_merged_unmerges_it_first():
    """PEFT's behaviour: a warning, then the merged weights are taken out and the new adapter applies."""
    lora = _two_adapters()
    batch = make_batch()
    base_weights = {k: v.detach().clone() for k, v in _base_weights(lora).items()}
    only_b = _only(lora, "b")
    lora.merge_adapter(["a"])
    with pytest.warns(UserWarning, match="unmerg"):
        lora.set_adapter("b")
    torch.testing.assert_close(_logits(lora, batch), _logits(only_b, batch), rtol=1e-5, atol=1e-5)
    assert not any(layer.merged for layer in lora.modules() if isinstance(layer, LoraLayer))
    for name, weight in _base_weights(lora).items():
        torch.testing.assert_close(weight, base_weights[name], rtol=0, atol=1e-6, msg=name)
