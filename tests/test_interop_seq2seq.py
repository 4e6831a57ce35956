"""PEFT parity for sequence-to-sequence models (task_type SEQ_2_SEQ_LM): T5 and BART, tiny and random.

Both directions with the same logits and the same generated ids: a lorafit adapter loads in PEFT's
PeftModel (PeftModelForSeq2SeqLM), its AutoPeftModelForSeq2SeqLM and transformers' ``load_adapter``;
a PEFT adapter loads in lorafit and merges to PEFT's merged model. The default targets are PEFT's
for the model type, files match PEFT's key for key and field for field, and a mixed-adapter batch
(forward and beam search) gives each row its own adapter's output.
"""

from __future__ import annotations

import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

from test_interop import _quiet, assert_close, randomise_, saved_tensors  # noqa: E402
from test_interop_architectures import assert_same_config_files  # noqa: E402

from lorafit import BASE_ADAPTER, LoraConfig, LoraModel, get_lora_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCAB = 100
# name -> (config class, model class, config fields): two encoder and two decoder layers, d_model 32; all-linear
# then targets 32 layers, so both libraries write the condensed target list PEFT writes from 20 targets on
ARCHITECTURES = {
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
}
CASES = [(arch, targets) for arch in ARCHITECTURES for targets in ("default", "all-linear")]
IDS = [f"{arch}-{targets}" for arch, targets in CASES]


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, fields = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**fields)).eval()


def lora_kwargs(arch: str, targets: str, r: int = 4) -> dict:
    """BART's alpha is large: the tiny random BART generates one token over and over unless its adapter is
    strong."""
    return dict(task_type="SEQ_2_SEQ_LM", r=r, lora_alpha=128 if arch == "bart" else 8,
                target_modules=None if targets == "default" else targets)


def batch_for(arch: str) -> dict[str, torch.Tensor]:
    """Three source rows (the last two padded) and decoder inputs that start with the decoder's start token."""
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    pad = ARCHITECTURES[arch][2]["pad_token_id"]
    for row, padded in ((1, 2), (2, 4)):
        attention_mask[row, -padded:] = 0
        input_ids[row, -padded:] = pad
    decoder_input_ids = torch.randint(3, VOCAB, (3, 6), generator=generator)
    decoder_input_ids[:, 0] = ARCHITECTURES[arch][2]["decoder_start_token_id"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


def logits(model, batch, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def generated(model, batch, **kwargs) -> torch.Tensor:
    """Greedy beam search of 8 new tokens from the source rows (no decoder inputs)."""
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=2,
                              do_sample=False, max_new_tokens=8, min_new_tokens=8, **kwargs)


def base_on_disk(arch: str, directory) -> torch.nn.Module:
    base = build(arch)
    base.save_pretrained(directory)
    base.config._name_or_path = str(directory)
    return base


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_default_targets_are_peft_defaults_for_the_model_type(arch):
    ours = get_lora_model(build(arch), LoraConfig(**lora_kwargs(arch, "default")))
    with _quiet():
        theirs = peft.get_peft_model(build(arch), peft.LoraConfig(**lora_kwargs(arch, "default")))
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    assert sorted(ours.peft_config["default"].target_modules) == {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}[arch]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_lorafit_adapter_loads_in_peft_auto_peft_and_transformers(arch, targets, tmp_path):
    ours = get_lora_model(base_on_disk(arch, tmp_path / "base"), LoraConfig(**lora_kwargs(arch, targets)))
    randomise_(ours)
    batch = batch_for(arch)
    expected, expected_ids = logits(ours, batch), generated(ours, batch)
    ours.save_pretrained(tmp_path / "adapter")
    assert not torch.allclose(logits(build(arch), batch), expected, atol=1e-3), "adapter is a no-op"
    assert not torch.equal(generated(build(arch), batch), expected_ids), "the adapter must change what is generated"

    with _quiet():
        theirs = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "adapter"))
        assert isinstance(theirs, peft.PeftModelForSeq2SeqLM)
        assert_close(logits(theirs, batch), expected)
        assert torch.equal(generated(theirs, batch), expected_ids)
        auto = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(str(tmp_path / "adapter"))
        assert_close(logits(auto, batch), expected)
        plain = build(arch)
        plain.load_adapter(str(tmp_path / "adapter"))
        assert_close(logits(plain, batch), expected)

    ours.merge_adapter()
    assert_close(logits(ours, batch), expected)
    assert torch.equal(generated(ours, batch), expected_ids)


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_peft_adapter_loads_in_lorafit_merges_alike_and_files_match(arch, targets, tmp_path):
    with _quiet():
        theirs = peft.get_peft_model(build(arch), peft.LoraConfig(**lora_kwargs(arch, targets)))
    randomise_(theirs)
    batch = batch_for(arch)
    expected, expected_ids = logits(theirs, batch), generated(theirs, batch)
    with _quiet():
        theirs.save_pretrained(str(tmp_path / "peft"))
    ours = LoraModel.from_pretrained(build(arch), tmp_path / "peft")
    assert_close(logits(ours, batch), expected)
    assert torch.equal(generated(ours, batch), expected_ids)
    with _quiet():
        assert_close(logits(ours.merge_and_unload(), batch), logits(theirs.merge_and_unload(), batch))

    get_lora_model(build(arch), LoraConfig(**lora_kwargs(arch, targets))).save_pretrained(tmp_path / "ours")
    ours_shapes = {k: tuple(v.shape) for k, v in saved_tensors(tmp_path / "ours").items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in saved_tensors(tmp_path / "peft").items()}
    assert any(".encoder." in k for k in ours_shapes) and any(".decoder." in k for k in ours_shapes)
    assert_same_config_files(tmp_path / "ours", tmp_path / "peft")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_training_step_matches_peft(arch):
    """The same adapter, labels and step size give the same loss and the same updated factors (dropout off,
    so that both runs are deterministic)."""
    batch = batch_for(arch)
    labels = batch.pop("decoder_input_ids")
    models = [get_lora_model(build(arch), LoraConfig(**lora_kwargs(arch, "default")))]
    with _quiet():
        models.append(peft.get_peft_model(build(arch), peft.LoraConfig(**lora_kwargs(arch, "default"))))
    losses, factors = [], []
    for model in models:
        randomise_(model)
        model.eval()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param -= 0.1 * param.grad
        losses.append(loss.item())
        factors.append({n: p.detach() for n, p in model.get_base_model().named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert factors[0].keys() == factors[1].keys() and factors[0]
    for name, value in factors[0].items():
        assert_close(value, factors[1][name])


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_mixed_batch_gives_each_row_its_adapter_in_forward_and_beam_search(arch, targets):
    model = get_lora_model(build(arch), LoraConfig(**lora_kwargs(arch, targets)), adapter_name="a")
    model.add_adapter("b", LoraConfig(**lora_kwargs(arch, targets, r=2)))
    randomise_(model, all_lora=True)
    batch = batch_for(arch)
    per_adapter = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        per_adapter[name] = (logits(model, batch), generated(model, batch))
    with model.disable_adapter():
        per_adapter[BASE_ADAPTER] = (logits(model, batch), generated(model, batch))
    assert not torch.equal(per_adapter["a"][1], per_adapter["b"][1]), "the adapters must generate differently"
    rows = ["b", BASE_ADAPTER, "a"]
    mixed_logits = logits(model, batch, adapter_names=rows)
    mixed_ids = generated(model, batch, adapter_names=rows)
    for row, name in enumerate(rows):
        assert_close(mixed_logits[row], per_adapter[name][0][row])
        assert torch.equal(mixed_ids[row], per_adapter[name][1][row])
