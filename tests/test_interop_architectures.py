"""PEFT parity on architectures beyond the four of test_interop.py, each as a tiny random model.

For every architecture and both the default targets (where PEFT has a default for the model type)
and "all-linear": a lorafit adapter loads in PEFT, in PEFT's AutoPeftModel and in transformers'
``load_adapter`` with the same logits; a PEFT adapter loads in lorafit with the same logits and merges
to the same model as in PEFT; both
libraries write the same tensor names, shapes and config fields for the same config; merged equals
unmerged; a mixed-adapter batch gives each row its own adapter's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

peft = pytest.importorskip("peft")

from conftest import make_batch  # noqa: E402
from test_interop import _quiet, assert_close, logits, logits_mixed, randomise_, saved_tensors  # noqa: E402

from lorafit import BASE_ADAPTER, LoraConfig, LoraModel, LorafitError, get_lora_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCAB = 100
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=37, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64)
# name -> (config class, model class, config fields); 1 layer, hidden 32, vocabulary 100
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DECODER, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DECODER),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_ENCODER, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, ffn_dim=37, max_position_embeddings=64,
                                                 word_embed_proj_dim=32, pad_token_id=0)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, bos_token_id=1, eos_token_id=2)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                                   n_positions=64, bos_token_id=1, eos_token_id=2)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=37, max_position_embeddings=64)),
    # the relative-position embeddings (one batch-1 input shared by all rows) go through pos_key_proj and
    # pos_query_proj, or with share_att_key (DeBERTa-v3's setting) through key_proj and query_proj
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   dict(_ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16,
                        share_att_key=False)),
    "deberta-v3": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   dict(_ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                        max_relative_positions=16, share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0)),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", dict(_ENCODER, embedding_size=16)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                    dict(_ENCODER, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1)),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification",
                   dict(_ENCODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                        global_attn_every_n_layers=1)),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", dict(_ENCODER, embedding_size=16)),
}
# architectures whose model type has default targets in PEFT 0.21 (deberta-v3 is model type deberta-v2)
HAS_PEFT_DEFAULT = {"qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt_neox", "opt", "falcon", "bloom", "gptj",
                    "deberta-v2", "deberta-v3", "electra", "xlm-roberta"}


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny model; Gemma's head is untied, so that merging LoRA into embed_tokens leaves lm_head alone."""
    config_cls, model_cls, fields = ARCHITECTURES[arch]
    if arch.startswith("gemma"):
        overrides = {"tie_word_embeddings": False, **overrides}
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**fields, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def is_classifier(arch: str) -> bool:
    return ARCHITECTURES[arch][1].endswith("SequenceClassification")


def lora_kwargs(arch: str, targets: str) -> dict:
    """The default targets (or the listed ones) with the model's task type; all-linear without one for decoders
    (PEFT's plain PeftModel, whose files carry auto_mapping) and with SEQ_CLS for classifiers."""
    task = "SEQ_CLS" if is_classifier(arch) else (None if targets == "all-linear" else "CAUSAL_LM")
    names = {"default": None, "all-linear": "all-linear"}.get(targets, targets.split(","))
    return dict(task_type=task, r=4, lora_alpha=8, target_modules=names)


CASES = [(arch, targets) for arch in ARCHITECTURES for targets in ("default", "all-linear")
         if targets == "all-linear" or arch in HAS_PEFT_DEFAULT]
CASES += [
    ("distilbert", "q_lin,v_lin"),  # PEFT's head for SEQ_CLS takes pre_classifier too (any name ending in classifier)
    ("gemma2", "embed_tokens,q_proj"),  # a scaled embedding (embed_scale): the LoRA update is scaled too
    ("gemma3", "embed_tokens,v_proj"),
]
# PEFT itself cannot build this one: its suffix rule makes pre_classifier both a LoRA target and the head
PEFT_CANNOT_BUILD = {("distilbert", "all-linear")}
IDS = [f"{arch}-{targets}" for arch, targets in CASES]


def batch_for(arch: str) -> dict[str, torch.Tensor]:
    return make_batch(vocab=VOCAB, batch=3, seq=10)


def base_on_disk(arch: str, directory) -> torch.nn.Module:
    """A base model saved where an adapter's base_model_name_or_path can point (for AutoPeftModel)."""
    base = build(arch)
    base.save_pretrained(directory)
    base.config._name_or_path = str(directory)
    return base


def peft_config_json(directory) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_lorafit_adapter_loads_in_peft_auto_peft_and_transformers(arch, targets, tmp_path):
    ours = get_lora_model(base_on_disk(arch, tmp_path / "base"), LoraConfig(**lora_kwargs(arch, targets)))
    randomise_(ours)
    batch = batch_for(arch)
    expected = logits(ours, batch)
    ours.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert not torch.allclose(build(arch)(**batch).logits, expected, atol=1e-3), "adapter is a no-op"

    with _quiet():
        theirs = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "adapter"))
        assert_close(logits(theirs, batch), expected)
        auto = (peft.AutoPeftModelForSequenceClassification if is_classifier(arch)
                else peft.AutoPeftModelForCausalLM).from_pretrained(str(tmp_path / "adapter"))
        assert_close(logits(auto, batch), expected)
        plain = build(arch)
        plain.load_adapter(str(tmp_path / "adapter"))
        assert_close(logits(plain, batch), expected)

    ours.merge_adapter()
    assert_close(logits(ours, batch), expected)


@pytest.mark.parametrize(("arch", "targets"), [c for c in CASES if c not in PEFT_CANNOT_BUILD],
                         ids=[i for c, i in zip(CASES, IDS) if c not in PEFT_CANNOT_BUILD])
def test_peft_adapter_loads_in_lorafit_and_files_match(arch, targets, tmp_path):
    kwargs = lora_kwargs(arch, targets)
    with _quiet():
        theirs = peft.get_peft_model(build(arch), peft.LoraConfig(**kwargs))
    randomise_(theirs)
    batch = batch_for(arch)
    expected = logits(theirs, batch)
    with _quiet():
        theirs.save_pretrained(str(tmp_path / "peft"))
    ours = LoraModel.from_pretrained(build(arch), tmp_path / "peft")
    assert_close(logits(ours, batch), expected)
    with _quiet():
        assert_close(logits(ours.merge_and_unload(), batch), logits(theirs.merge_and_unload(), batch))

    own = get_lora_model(build(arch), LoraConfig(**kwargs))
    with _quiet():
        fresh = peft.get_peft_model(build(arch), peft.LoraConfig(**kwargs))
    assert own.get_nb_trainable_parameters() == fresh.get_nb_trainable_parameters()
    own.save_pretrained(tmp_path / "ours")
    ours_shapes = {k: tuple(v.shape) for k, v in saved_tensors(tmp_path / "ours").items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in saved_tensors(tmp_path / "peft").items()}
    assert len(ours_shapes) > 0
    assert_same_config_files(tmp_path / "ours", tmp_path / "peft")


def assert_same_config_files(ours_dir, peft_dir) -> None:
    """Every field PEFT writes, with PEFT's value; target_modules compared as sets (PEFT writes a set)."""
    ours, theirs = peft_config_json(ours_dir), peft_config_json(peft_dir)
    theirs.pop("peft_version")  # PEFT's own version number; lorafit does not claim one
    assert set(ours) == set(theirs)
    assert sorted(ours.pop("target_modules")) == sorted(theirs.pop("target_modules"))
    assert ours == theirs


# a targeted projection runs on DeBERTa's relative-position embeddings, one input all rows share
SHARED_INPUT_TARGETED = {("deberta-v2", "all-linear"), ("deberta-v3", "default"), ("deberta-v3", "all-linear")}


@pytest.mark.parametrize(("arch", "targets"), CASES, ids=IDS)
def test_mixed_batch_gives_each_row_its_adapter(arch, targets):
    model = get_lora_model(build(arch), LoraConfig(**lora_kwargs(arch, targets)), adapter_name="a")
    model.add_adapter("b", LoraConfig(**{**lora_kwargs(arch, targets), "r": 2}))
    randomise_(model, all_lora=True)
    model.set_adapter("b")
    randomise_(model, seed=8)  # b's head copy too
    batch = batch_for(arch)
    per_adapter = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        per_adapter[name] = logits(model, batch)
    with model.disable_adapter():
        per_adapter[BASE_ADAPTER] = logits(model, batch)
    rows = ["b", BASE_ADAPTER, "a"]
    if (arch, targets) in SHARED_INPUT_TARGETED:
        # no per-row choice is possible on an input all rows share: refused in one line, nothing changed
        with pytest.raises(LorafitError, match="shared by all 3 rows") as error:
            logits_mixed(model, batch, rows)
        assert "\n" not in str(error.value)
        rows = ["b", "b", "b"]  # rows that agree still work
        assert model.routing.adapter_names is None
    mixed = logits_mixed(model, batch, rows)
    for row, name in enumerate(rows):
        assert_close(mixed[row], per_adapter[name][row])
