"""Adapter files move between lorafit and the real `peft` package, in both directions.

Each case builds the same tiny random base model twice (same seed, so identical weights), puts an
adapter with random (non-zero) weights on one copy, saves it, loads it onto the other copy with the
other library and compares logits. Random LoRA factors and random head copies make the comparison
meaningful: a silently dropped tensor changes the logits.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_roberta_cls  # noqa: E402

from lorafit import LoraConfig, LoraModel, get_lora_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's

ATOL = 1e-5

# id -> (base model builder, LoraConfig kwargs understood identically by lorafit and PEFT)
CASES = {
    "bert-seqcls": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])),
    "roberta-seqcls": (tiny_roberta_cls, dict(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["query"])),
    "llama-qv": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear": (tiny_llama, dict(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules="all-linear")),
    "gpt2-c_attn": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"],
                                    fan_in_fan_out=True)),
    "gpt2-all-linear": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules="all-linear",
                                        fan_in_fan_out=True)),
    # PEFT writes fan_in_fan_out=True for GPT-2; it must not transpose an nn.Linear target (lm_head)
    "gpt2-conv1d-and-linear": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                               target_modules=["c_attn", "lm_head"], fan_in_fan_out=True)),
    "llama-modules-to-save": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["lm_head", "post_attention_layernorm"])),
    "bert-seqcls-modules-to-save": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                        target_modules=["query", "value"],
                                                        modules_to_save=["pooler"])),
    "llama-rslora": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=16, use_rslora=True,
                                      target_modules=["q_proj", "v_proj"])),
    "llama-rank-alpha-pattern": (tiny_llama, dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6}, alpha_pattern={"k_proj": 3, "o_proj": 24})),
    "llama-embedding": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                         target_modules=["embed_tokens", "q_proj"])),
    "gpt2-embedding": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["wte", "c_attn"],
                                       fan_in_fan_out=True)),
}


def randomise_(model: torch.nn.Module, seed: int = 7, all_lora: bool = False) -> None:
    """Give every trainable tensor (LoRA factors, trained head copies) random values; with
    ``all_lora`` every LoRA factor, including those of inactive (frozen) adapters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad or (all_lora and ".lora_" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def logits_mixed(model, batch, names):
    model.eval()
    with torch.no_grad():
        return model(**batch, adapter_names=names).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.3g} > {ATOL}"


def batch_for(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    return make_batch(vocab=base.config.vocab_size, batch=3, seq=10)


def lorafit_adapter(case: str, seed: int = 0):
    build, kwargs = CASES[case]
    model = get_lora_model(build(seed), LoraConfig(**kwargs))
    randomise_(model)
    return model


def peft_adapter(case: str, seed: int = 0):
    build, kwargs = CASES[case]
    with _quiet():
        model = peft.get_peft_model(build(seed), peft.LoraConfig(**kwargs))
    randomise_(model)
    return model


@contextlib.contextmanager
def _quiet():
    """Silence PEFT's informational warnings (fan_in_fan_out fixes, tied embeddings) for one block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


# --- both directions, same logits -----------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_lorafit_adapter_loads_in_peft(case, tmp_path):
    ours = lorafit_adapter(case)
    base = ours.model
    batch = batch_for(base)
    ours.save_pretrained(tmp_path)
    expected = logits(ours, batch)

    build, _ = CASES[case]
    fresh = build(0)
    with torch.no_grad():
        assert not torch.allclose(fresh(**batch).logits, expected, atol=1e-3), "adapter is a no-op: test is void"
    with _quiet():
        theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert_close(logits(theirs, batch), expected)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorafit(case, tmp_path):
    theirs = peft_adapter(case)
    batch = batch_for(theirs.get_base_model())
    with _quiet():
        theirs.save_pretrained(str(tmp_path / "peft"))
    expected = logits(theirs, batch)

    build, _ = CASES[case]
    ours = LoraModel.from_pretrained(build(0), tmp_path / "peft")
    assert_close(logits(ours, batch), expected)
    with ours.disable_adapter():  # and the adapter really did something
        assert not torch.allclose(logits(ours, batch), expected, atol=1e-3)

    # the same config in lorafit: same trainable/all counts, same tensor names and shapes on disk
    own = lorafit_adapter(case)
    assert own.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    own.save_pretrained(tmp_path / "ours")
    ours_shapes = {k: tuple(v.shape) for k, v in saved_tensors(tmp_path / "ours").items()}
    # including the full base weight of a targeted embed_tokens / lm_head (PEFT's save_embedding_layers="auto")
    peft_shapes = {k: tuple(v.shape) for k, v in saved_tensors(tmp_path / "peft").items()}
    assert ours_shapes == peft_shapes


# --- file layout and keys -------------------------------------------------------------------------

def test_seq_cls_keys_roberta(tmp_path):
    ours = lorafit_adapter("roberta-seqcls")
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = saved_tensors(tmp_path)
    assert set(tensors) == {
        "base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight",
        "base_model.model.roberta.encoder.layer.0.attention.self.query.lora_B.weight",
        "base_model.model.roberta.encoder.layer.1.attention.self.query.lora_A.weight",
        "base_model.model.roberta.encoder.layer.1.attention.self.query.lora_B.weight",
        "base_model.model.classifier.dense.weight",
        "base_model.model.classifier.dense.bias",
        "base_model.model.classifier.out_proj.weight",
        "base_model.model.classifier.out_proj.bias",
    }
    assert not any("default" in key or "modules_to_save" in key for key in tensors)
    # the trained head copy is what is saved, not the frozen original
    head = ours.model.classifier.modules_to_save["default"]
    assert torch.equal(tensors["base_model.model.classifier.dense.weight"], head.dense.weight)
    assert not torch.equal(head.dense.weight, ours.model.classifier.original_module.dense.weight)


def test_seq_cls_keys_bert(tmp_path):
    lorafit_adapter("bert-seqcls").save_pretrained(tmp_path)
    keys = set(saved_tensors(tmp_path))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight" in keys
    assert len(keys) == 2 + 2 * 2 * 2


def test_adapter_config_has_what_peft_needs(tmp_path):
    lorafit_adapter("roberta-seqcls").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA"
    assert data["task_type"] == "SEQ_CLS"
    assert data["r"] == 4 and data["lora_alpha"] == 16
    assert data["target_modules"] == ["query"]
    assert data["inference_mode"] is True
    assert "classifier" in data["modules_to_save"]
    assert data["use_dora"] is False
    config = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 16, {"query"})


def test_multi_adapter_layout_lorafit_to_peft(tmp_path):
    ours = lorafit_adapter("llama-qv")
    ours.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["k_proj"]))
    randomise_(ours, seed=11, all_lora=True)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    batch = batch_for(ours.model)
    expected_default = logits(ours, batch)
    ours.set_adapter("other")
    expected_other = logits(ours, batch)

    theirs = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert_close(logits(theirs, batch), expected_default)
    theirs.set_adapter("other")
    assert_close(logits(theirs, batch), expected_other)


def test_multi_adapter_layout_peft_to_lorafit(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**CASES["llama-qv"][1]))
    theirs.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["k_proj"]))
    randomise_(theirs, seed=3, all_lora=True)
    theirs.save_pretrained(str(tmp_path))
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    batch = batch_for(theirs.get_base_model())
    expected_default = logits(theirs, batch)
    theirs.set_adapter("other")
    expected_other = logits(theirs, batch)

    ours = LoraModel.from_pretrained(tiny_llama(0), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    assert_close(logits(ours, batch), expected_default)
    ours.set_adapter("other")
    assert_close(logits(ours, batch), expected_other)
    # and a mixed batch runs each row with its own adapter
    mixed = logits_mixed(ours, batch, ["default", "other", "default"])
    assert_close(mixed[0], expected_default[0])
    assert_close(mixed[1], expected_other[1])
    assert_close(mixed[2], expected_default[2])


def test_lorafit_adapter_is_trainable_in_peft(tmp_path):
    """is_trainable=True in PEFT unfreezes exactly the adapter tensors lorafit saved."""
    ours = lorafit_adapter("roberta-seqcls")
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_roberta_cls(0), str(tmp_path), is_trainable=True)
    ours_counts = ours.get_nb_trainable_parameters()
    assert theirs.get_nb_trainable_parameters() == ours_counts
    reloaded = LoraModel.from_pretrained(tiny_roberta_cls(0), tmp_path, is_trainable=True)
    assert reloaded.get_nb_trainable_parameters() == ours_counts


# --- the article's parameter report ---------------------------------------------------------------

def test_article_parameter_report(capsys):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    base = RobertaForSequenceClassification(
        RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2))
    model = get_lora_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32, lora_dropout=0.01,
                                            target_modules=["query"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 665,858 || all params: 125,313,028 || trainable%: 0.5314\n"
    assert model.get_nb_trainable_parameters() == (665_858, 125_313_028)


# --- adapter_config.json field for field --------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
         layers_pattern="layers"),
    dict(r=4, target_modules="all-linear"),  # no task_type: auto_mapping; all-linear written as the module names
    dict(task_type="CAUSAL_LM", r=4, target_modules=["embed_tokens", "q_proj"], bias="all"),
], ids=["layers-pattern", "all-linear-no-task", "embedding-bias-all"])
def test_adapter_config_json_matches_peft_field_for_field(kwargs, tmp_path):
    get_lora_model(tiny_llama(0), LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    with _quiet():
        peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**kwargs)).save_pretrained(str(tmp_path / "peft"))
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    del theirs["peft_version"]  # PEFT's own version number; lorafit claims none
    assert sorted(ours.pop("target_modules")) == sorted(theirs.pop("target_modules"))  # PEFT writes a set
    assert ours == theirs
    assert sorted(saved_tensors(tmp_path / "ours")) == sorted(saved_tensors(tmp_path / "peft"))


def test_auto_peft_model_loads_a_lorafit_adapter_without_task_type(tmp_path):
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")
    ours = get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise_(ours)
    ours.save_pretrained(tmp_path / "adapter")
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert data["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                    "parent_library": "transformers.models.llama.modeling_llama"}
    batch = batch_for(base)
    with _quiet():
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert_close(logits(theirs, batch), logits(ours, batch))


def test_resized_vocabulary_saves_the_embeddings_as_peft_does(tmp_path):
    """PEFT's save_embedding_layers="auto": when the vocabulary grew since the base model on disk, the whole
    input and output embeddings go into the adapter file, and loading puts them back."""
    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "base")

    def resized():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(110)
        torch.manual_seed(5)  # the new rows differ between copies unless the file brings them
        with torch.no_grad():
            model.get_input_embeddings().weight[100:].normal_()
            model.get_output_embeddings().weight[100:].normal_()
        return model.eval()

    kwargs = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"])
    ours = get_lora_model(resized(), LoraConfig(**kwargs))
    randomise_(ours)
    with torch.no_grad():
        ours.model.get_input_embeddings().weight[100:] += 1.0  # as training new tokens would
    ours.save_pretrained(tmp_path / "ours")
    with _quiet():
        theirs = peft.get_peft_model(resized(), peft.LoraConfig(**kwargs))
        theirs.save_pretrained(str(tmp_path / "peft"))
    assert {k: v.shape for k, v in saved_tensors(tmp_path / "ours").items()} == \
        {k: v.shape for k, v in saved_tensors(tmp_path / "peft").items()}
    assert saved_tensors(tmp_path / "ours")["base_model.model.model.embed_tokens.weight"].shape == (110, 32)
    batch = make_batch(vocab=110, batch=3, seq=10)
    with _quiet():
        loaded = peft.PeftModel.from_pretrained(resized(), str(tmp_path / "ours"))
    assert_close(logits(loaded, batch), logits(ours, batch))
    assert_close(logits(LoraModel.from_pretrained(resized(), tmp_path / "ours"), batch), logits(ours, batch))
