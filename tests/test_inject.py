"""Which modules a LoraConfig adapts: names, regexes, all-linear, exclusions, layers, heads; checked against PEFT."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta_cls
from lorafit import LoraConfig, LoraLayer, LorafitError, get_lora_model
from lorafit.saved_modules import ModulesToSave



def ours(model, **config) -> list[str]:
    lora = get_lora_model(model, LoraConfig(**config))
    return sorted(name for name, m in lora.model.named_modules() if isinstance(m, LoraLayer))


def theirs(model, **config) -> list[str]:
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    return sorted(name for name, m in peft_model.base_model.model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def linear_names(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)))


class Named(nn.Module):
    """Linear layers with tricky names: only whole dotted components may match a list target."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.my_query_x = nn.Linear(4, 4)
        self.queryx = nn.Linear(4, 4)
        self.xquery = nn.Linear(4, 4)
        self.sub = nn.Module()
        self.sub.query = nn.Linear(4, 4)
        self.sub.self_query = nn.Linear(4, 4)
        self.sub.attn = nn.Module()
        self.sub.attn.query = nn.Linear(4, 4)


# --- list targets ---------------------------------------------------------------------------------------
def test_list_target_matches_whole_dotted_components_only():
    assert ours(Named(), target_modules=["query"]) == ["query", "sub.attn.query", "sub.query"]
    assert ours(Named(), target_modules=["attn.query"]) == ["sub.attn.query"]
    assert ours(Named(), target_modules=["sub.query", "my_query_x"]) == ["my_query_x", "sub.query"]
    with pytest.raises(LorafitError):
        ours(Named(), target_modules=["uery"])
    with pytest.raises(LorafitError):
        ours(Named(), target_modules=["b.query"])  # 'sub.query' ends with 'b.query' but not at a dot


def test_list_target_full_name_and_suffix_on_bert():
    model = tiny_bert_cls()
    full = "bert.encoder.layer.1.attention.self.query"
    assert ours(model, target_modules=[full]) == [full]
    expected = sorted(n for n in linear_names(tiny_bert_cls()) if n.endswith(".self.query") or n.endswith(".value"))
    assert ours(tiny_bert_cls(), target_modules=["self.query", "value"]) == expected
    assert len(expected) == 4


def test_list_target_agrees_with_peft():
    kwargs = dict(target_modules=["query", "output.dense"])
    assert ours(tiny_bert_cls(), **kwargs) == theirs(tiny_bert_cls(), **kwargs)


# --- regex targets --------------------------------------------------------------------------------------
def test_regex_target_is_a_fullmatch_of_the_full_name():
    pattern = r".*\.0\..*(query|key)"
    expected = sorted(n for n in linear_names(tiny_bert_cls()) if re.fullmatch(pattern, n))
    assert expected == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    assert ours(tiny_bert_cls(), target_modules=pattern) == expected
    assert ours(tiny_bert_cls(), target_modules=pattern) == theirs(tiny_bert_cls(), target_modules=pattern)


def test_regex_target_must_match_the_whole_name():
    # re.search would find 'query' in every query's name; fullmatch finds nothing
    with pytest.raises(LorafitError, match="matched nothing"):
        ours(tiny_bert_cls(), target_modules="query")
    with pytest.raises(LorafitError):
        ours(Named(), target_modules="query_x")  # 'my_query_x' contains it but does not fullmatch
    assert ours(Named(), target_modules=r"\w*query\w*") == ["my_query_x", "query", "queryx", "xquery"]


# --- all-linear -----------------------------------------------------------------------------------------
def test_all_linear_on_causal_lm_skips_only_the_output_head():
    model = tiny_llama()
    everything = linear_names(model)
    assert "lm_head" in everything
    assert ours(model, target_modules="all-linear") == [n for n in everything if n != "lm_head"]


def test_all_linear_on_gpt2_takes_conv1d_and_skips_lm_head():
    got = ours(tiny_gpt2(), target_modules="all-linear")
    assert got == sorted(n for n in linear_names(tiny_gpt2()) if n != "lm_head")
    assert {n.rsplit(".", 1)[-1] for n in got} == {"c_attn", "c_proj", "c_fc"}


def test_all_linear_skips_the_classifier():
    got = ours(tiny_bert_cls(), target_modules="all-linear")
    assert "classifier" not in got
    assert got == [n for n in linear_names(tiny_bert_cls()) if n != "classifier"]
    llama_cls = tiny_llama_cls()
    got = ours(llama_cls, target_modules="all-linear", task_type="SEQ_CLS")
    assert "score" not in got and got == [n for n in linear_names(tiny_llama_cls()) if n != "score"]


@pytest.mark.parametrize(("builder", "task"), [(tiny_bert_cls, "SEQ_CLS"), (tiny_roberta_cls, "SEQ_CLS"),
                                               (tiny_llama, "CAUSAL_LM"), (tiny_gpt2, "CAUSAL_LM")])
def test_all_linear_agrees_with_peft(builder, task):
    kwargs = dict(task_type=task, target_modules="all-linear")
    assert ours(builder(), **kwargs) == theirs(builder(), **kwargs)


def tiny_llama_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, num_labels=3)
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


# --- default targets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [tiny_bert_cls, tiny_gpt2, tiny_llama])
def test_default_targets_agree_with_peft(builder):
    got = ours(builder())
    assert got and got == theirs(builder())


# --- exclusions and layers ------------------------------------------------------------------------------
def test_exclude_modules_list_and_regex():
    got = ours(tiny_bert_cls(), target_modules=["query", "dense"], exclude_modules=["output.dense"])
    assert not any(n.endswith("output.dense") for n in got)
    assert "bert.encoder.layer.0.intermediate.dense" in got and "bert.pooler.dense" in got
    assert got == theirs(tiny_bert_cls(), target_modules=["query", "dense"], exclude_modules=["output.dense"])
    got = ours(tiny_bert_cls(), target_modules=["query", "value"], exclude_modules=r".*layer\.1\..*")
    assert got == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]


def test_exclude_everything_raises():
    with pytest.raises(LorafitError, match="matched nothing"):
        ours(tiny_bert_cls(), target_modules=["query"], exclude_modules=["query"])


@pytest.mark.parametrize(("builder", "targets", "pattern"), [
    (tiny_bert_cls, ["query", "dense"], None), (tiny_bert_cls, ["query", "dense"], "layer"),
    (tiny_llama, ["q_proj", "down_proj"], None), (tiny_llama, ["q_proj", "down_proj"], "layers"),
    (tiny_gpt2, ["c_attn", "c_fc"], "h"),
])
@pytest.mark.parametrize("layers", [[0], [1], 1])
def test_layers_to_transform(builder, targets, pattern, layers):
    kwargs = dict(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    got = ours(builder(), **kwargs)
    index = layers[0] if isinstance(layers, list) else layers
    assert got and all(f".{index}." in n for n in got)
    assert got == theirs(builder(), **kwargs)
    # the pooler's dense sits in no layer and is never taken
    assert "bert.pooler.dense" not in got


def test_layers_pattern_that_names_no_layer_list_matches_nothing():
    with pytest.raises(LorafitError):
        ours(tiny_llama(), target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks")


# --- errors ---------------------------------------------------------------------------------------------
def test_unmatched_target_lists_real_module_names():
    with pytest.raises(LorafitError) as excinfo:
        ours(tiny_bert_cls(), target_modules=["q_proj", "v_proj"])
    message = str(excinfo.value)
    assert "q_proj" in message and "matched nothing" in message
    for real in ("query", "value", "key", "dense"):
        assert real in message
    assert isinstance(excinfo.value, ValueError)


def test_unmatched_target_on_llama_lists_llama_names():
    with pytest.raises(LorafitError) as excinfo:
        ours(tiny_llama(), target_modules=["query"])
    assert "q_proj" in str(excinfo.value) and "v_proj" in str(excinfo.value)


def test_error_hint_after_an_adapter_names_modules_not_wrapper_internals():
    lora = get_lora_model(tiny_bert_cls(), LoraConfig(target_modules=["query", "value"]))
    with pytest.raises(LorafitError) as excinfo:
        lora.add_adapter("other", LoraConfig(target_modules=["nope"]))
    message = str(excinfo.value)
    assert "query" in message and "value" in message
    assert "base_layer" not in message and "original_module" not in message
    assert "other" not in lora.peft_config


def test_non_adaptable_module_type_raises():
    with pytest.raises(LorafitError, match="LayerNorm"):
        ours(tiny_bert_cls(), target_modules=["LayerNorm"])


def test_unmatched_modules_to_save_raises():
    with pytest.raises(LorafitError, match="head"):
        ours(tiny_bert_cls(), target_modules=["query"], modules_to_save=["head"])


def test_no_default_targets_for_unknown_architecture():
    with pytest.raises(LorafitError, match="target_modules"):
        ours(Named())


# --- heads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("builder", "head"), [(tiny_bert_cls, "classifier"), (tiny_llama_cls, "score")])
def test_seq_cls_head_is_trainable_and_saved(builder, head, tmp_path):
    from safetensors.torch import load_file

    model = builder()
    original = {k: v.clone() for k, v in model.get_submodule(head).state_dict().items()}
    lora = get_lora_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"))
    wrapper = lora.model.get_submodule(head)
    assert isinstance(wrapper, ModulesToSave)
    copy = wrapper.modules_to_save["default"]
    for key, value in copy.state_dict().items():
        assert torch.equal(value, original[key])  # starts as the original head
    assert all(p.requires_grad for p in copy.parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    trainable = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" not in n} == {f"{head}.modules_to_save.default.{k}" for k in original}

    lora.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for key in original:
        assert torch.equal(saved[f"base_model.model.{head}.{key}"], original[key])


def test_seq_cls_head_gets_gradients_and_the_original_stays():
    model = tiny_bert_cls()
    original = model.classifier.weight.detach().clone()
    lora = get_lora_model(model, LoraConfig(task_type="SEQ_CLS", r=2))
    lora.train()
    lora(**make_batch(batch=2), labels=torch.tensor([0, 1])).loss.backward()
    wrapper = lora.model.classifier
    assert wrapper.modules_to_save["default"].weight.grad is not None
    assert wrapper.original_module.weight.grad is None
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    assert torch.equal(wrapper.original_module.weight, original)


def test_targets_inside_the_saved_head_are_not_adapted():
    got = ours(tiny_roberta_cls(), task_type="SEQ_CLS", target_modules=["dense", "out_proj"])
    assert got and not any(n.startswith("classifier") for n in got)


def test_causal_lm_has_no_saved_head():
    lora = get_lora_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=2))
    assert not any(isinstance(m, ModulesToSave) for m in lora.modules())
    assert all(".lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_default_targets_include_every_model_type_peft_knows():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults
    from lorafit.inject import DEFAULT_TARGETS

    for model_type, targets in peft_defaults.items():
        ours = DEFAULT_TARGETS.get(model_type)
        assert ours is not None, model_type
        assert (ours == targets) if isinstance(targets, str) else sorted(ours) == sorted(targets), model_type


# --- long target lists: PEFT's condensed names ----------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert_cls, tiny_gpt2])
def test_long_target_lists_condense_to_the_suffixes_peft_picks(build):
    """From 20 targets on PEFT writes the shortest suffixes that pick out the same modules; PEFT's own function
    (private, so the reference lives here only) is compared on random subsets of each model's modules."""
    import random

    from peft.tuners.tuners_utils import _find_minimal_target_modules

    from lorafit.inject import shortest_target_names

    model = build(num_hidden_layers=6) if build is not tiny_gpt2 else build(n_layer=6)
    names = [name for name, _ in model.named_modules()]
    rng = random.Random(0)
    for _ in range(40):
        targets = rng.sample([n for n in names if n], rng.randint(20, 40))
        others = [n for n in names if n not in targets and not n.endswith(tuple("." + t for t in targets))]
        expected = _find_minimal_target_modules(targets, others)
        expected = sorted(expected) if len(expected) < len(set(targets)) else targets
        assert shortest_target_names(targets, names) == expected


def test_all_linear_on_many_layers_writes_peft_target_list(tmp_path):
    ours_model = get_lora_model(tiny_llama(num_hidden_layers=4), LoraConfig(r=2, target_modules="all-linear"))
    peft_model = peft.get_peft_model(tiny_llama(num_hidden_layers=4), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert len(linear_names(tiny_llama(num_hidden_layers=4))) >= 20
    assert sorted(ours_model.peft_config["default"].target_modules) == \
        sorted(peft_model.peft_config["default"].target_modules)
    assert sorted(ours(tiny_llama(num_hidden_layers=4), r=2, target_modules="all-linear")) == \
        sorted(theirs(tiny_llama(num_hidden_layers=4), r=2, target_modules="all-linear"))
