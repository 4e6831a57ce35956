"""QLoRA: LoRA layers around bitsandbytes' 4-bit and 8-bit layers, against PEFT's on the same quantized model.

Both sides load one saved tiny model through the same BitsAndBytesConfig, so their quantized weights are the
same bytes: outputs then agree to fp32 rounding (measured: max |difference| 0.0 for 4-bit and 8-bit on
bitsandbytes 0.50.2, CPU), and the tolerance below is the fp32 one. What the quantization itself costs
(quantized against fp32 outputs) is a property of bitsandbytes, not of lorafit, and is not asserted here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_bert_cls, tiny_llama
from lorafit.config import LoraConfig
from lorafit.inference.base_models import load_causal_lm, load_classifier
from lorafit.model import LoraModel, get_lora_model
from lorafit.quantized import QuantizedLoraLinear, dequantized_weight, is_quantized
from lorafit.training.settings import QuantizeSettings

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

ATOL = 1e-5
SETTINGS = {"nf4": QuantizeSettings("4bit"),
            "fp4-double": QuantizeSettings("4bit", bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
            "int8": QuantizeSettings("8bit")}
IDS = torch.tensor([[5, 17, 33, 2, 41, 9, 60, 12], [7, 7, 90, 3, 25, 14, 8, 71]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return str(path)


def quantized_llama(path: str, settings: QuantizeSettings) -> nn.Module:
    return load_causal_lm(path, quantization=settings)


def lora_config(**overrides) -> dict:
    return {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0,
            "init_lora_weights": False, **overrides}


def both(path: str, settings: QuantizeSettings, **overrides) -> tuple[LoraModel, nn.Module]:
    """Ours and PEFT's on two loads of the same quantized model, each with a random (non-zero) adapter."""
    torch.manual_seed(0)
    ours = get_lora_model(quantized_llama(path, settings), LoraConfig(**lora_config(**overrides)))
    theirs = peft.get_peft_model(quantized_llama(path, settings), peft.LoraConfig(**lora_config(**overrides)))
    return ours, theirs


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_layers_wrap_the_quantized_ones_and_keep_them_packed(llama_dir, kind):
    ours, _ = both(llama_dir, SETTINGS[kind])
    layer = ours.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLoraLinear) and is_quantized(layer.base_layer)
    assert layer.base_layer.weight.dtype in (torch.uint8, torch.int8)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert not is_quantized(ours.model.lm_head)  # transformers keeps the LM head in fp32


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_outputs_equal_peft_with_each_others_files(llama_dir, kind, tmp_path):
    ours, theirs = both(llama_dir, SETTINGS[kind])
    theirs.save_pretrained(tmp_path / "peft")
    ours.load_adapter(tmp_path / "peft", "from_peft")
    ours.set_adapter("from_peft")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=ATOL, rtol=0)
        ours.set_adapter("default")
        ours.save_pretrained(tmp_path / "ours")
        reloaded = peft.PeftModel.from_pretrained(quantized_llama(llama_dir, SETTINGS[kind]), str(tmp_path / "ours"))
        ours_logits = ours(input_ids=IDS).logits
        torch.testing.assert_close(ours_logits, reloaded.eval()(input_ids=IDS).logits, atol=ATOL, rtol=0)
        with ours.disable_adapter():
            assert not torch.allclose(ours(input_ids=IDS).logits, ours_logits, atol=1e-3)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_on_a_quantized_base_equals_peft_with_each_others_files(llama_dir, kind, tmp_path):
    ours, theirs = both(llama_dir, SETTINGS[kind], use_dora=True)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    ours.load_adapter(tmp_path / "peft", "from_peft")
    ours.set_adapter("from_peft")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=ATOL, rtol=0)
        ours.set_adapter("default")
        reloaded = peft.PeftModel.from_pretrained(quantized_llama(llama_dir, SETTINGS[kind]), str(tmp_path / "ours"))
        torch.testing.assert_close(ours(input_ids=IDS).logits, reloaded.eval()(input_ids=IDS).logits,
                                   atol=ATOL, rtol=0)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {name.removeprefix("base_model.").removeprefix("model."): p.grad
            for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_gradients_reach_only_the_adapter_and_equal_peft(llama_dir, kind):
    ours, theirs = both(llama_dir, SETTINGS[kind])
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                theirs.get_parameter(f"base_model.{name}").copy_(param)
    ours_grads, peft_grads = gradients(ours), gradients(theirs)
    assert ours_grads and all(".lora_A." in n or ".lora_B." in n for n in ours_grads)
    assert ours_grads.keys() == peft_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], atol=ATOL, rtol=1e-4, msg=name)
    packed = ours.model.model.layers[0].mlp.up_proj.base_layer.weight.data.clone()
    torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(ours.model.model.layers[0].mlp.up_proj.base_layer.weight.data, packed)


def test_gradient_checkpointing_keeps_the_gradients(llama_dir):
    plain, _ = both(llama_dir, SETTINGS["nf4"])
    checkpointed, _ = both(llama_dir, SETTINGS["nf4"])
    checkpointed.gradient_checkpointing_enable({"use_reentrant": False})
    expected, got = gradients(plain), gradients(checkpointed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=1e-4, msg=name)


def identity_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a quantized layer multiplies with, read off its outputs on the unit vectors (no bnb internals)."""
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        out = layer(eye)
    return (out - (layer.bias if layer.bias is not None else 0)).T


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_dequantized_weight_is_what_the_layer_multiplies_with(llama_dir, kind):
    layer = quantized_llama(llama_dir, SETTINGS[kind]).model.layers[1].mlp.down_proj
    # LLM.int8() multiplies in fp16: its output is the int8 weight times its scale, rounded to fp16
    rtol = 1e-3 if kind == "int8" else 0
    torch.testing.assert_close(dequantized_weight(layer), identity_weight(layer), atol=ATOL, rtol=rtol)


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_merge_dequantizes_and_adds_the_update_in_fp32(llama_dir, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    ours, _ = both(llama_dir, SETTINGS[kind])
    ours.eval()
    layer = ours.model.model.layers[0].self_attn.v_proj
    expected_weight = dequantized_weight(layer.base_layer) + layer.delta_weight("default")
    with torch.no_grad():
        unmerged = ours(input_ids=IDS).logits
    merged = ours.merge_and_unload()
    assert not any(is_quantized(m) for m in merged.modules())
    assert merged.model.layers[0].self_attn.v_proj.weight.dtype == torch.float32
    torch.testing.assert_close(merged.model.layers[0].self_attn.v_proj.weight, expected_weight, atol=0, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = reloaded(input_ids=IDS).logits
    # 4-bit: the layers multiply the same de-quantized weights, so only fp32 rounding differs; LLM.int8()
    # also rounds the activations to int8, which the merged fp32 model does not
    torch.testing.assert_close(logits, unmerged, atol=ATOL if kind != "int8" else 0.05, rtol=0)


def test_merge_in_place_and_unmerge_keep_the_outputs(llama_dir):
    ours, _ = both(llama_dir, SETTINGS["nf4"])
    ours.eval()
    with torch.no_grad():
        before = ours(input_ids=IDS).logits
        ours.merge_adapter(safe_merge=True)
        assert not is_quantized(ours.model.model.layers[0].self_attn.q_proj.base_layer)
        torch.testing.assert_close(ours(input_ids=IDS).logits, before, atol=ATOL, rtol=0)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(input_ids=IDS).logits, before, atol=ATOL, rtol=0)


def test_classifier_head_stays_fp32_and_trains(tmp_path):
    tiny_bert_cls(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    base = load_classifier(str(tmp_path), num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1},
                           quantization=SETTINGS["nf4"])
    assert is_quantized(base.bert.encoder.layer[0].attention.self.query)
    assert type(base.classifier) is nn.Linear
    model = get_lora_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("classifier" in n for n in trained) and any("lora_B" in n for n in trained)

