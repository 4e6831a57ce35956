"""`lorafit export --format gguf`: llama.cpp's tensor names and adapter metadata, the Q/K row order, scalings
folded into B, tensor types, and what is refused. Tiny models from configs; the real runtime check is in
test_export_runtimes.py.

The reference for llama.cpp's layout is outside lorafit: llama.cpp's rule for applying an adapter
(``scale = adapter.lora.alpha / rank``, rank read from B; ``delta = B A``, for the token embedding rows of
``A B^T``), and transformers' GGUF loader, which undoes llama.cpp's Q/K permutation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from test_causal_lm import save_tiny_model
from test_cli import assert_one_line_error, run_cli

from lorafit import LoraConfig, LoraModel, LorafitError
from lorafit.export.gguf_adapter import export_gguf_adapter
from lorafit.inference.adapter_info import save_adapter_info

gguf = pytest.importorskip("gguf")

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reverse_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's Q/K row order back to transformers', by transformers' own GGUF loader."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(weights, n_head, n_head_kv)


def save_lora(model, config: LoraConfig, directory: Path, seed: int = 0) -> LoraModel:
    torch.manual_seed(seed)
    lora = LoraModel(model, config)
    lora.save_pretrained(directory)
    return lora


def read_adapter_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """(metadata, {name: de-quantized values}, {name: tensor type}) as a GGUF reader sees them."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    values = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
              for t in reader.tensors}
    return fields, values, {t.name: t.tensor_type.name for t in reader.tensors}


def llama_cpp_delta(values: dict[str, np.ndarray], name: str, alpha: float) -> np.ndarray:
    """The weight change llama.cpp applies for one tensor: (alpha / rank) * B A, rank = B's columns."""
    lora_a, lora_b = values[f"{name}.lora_a"], values[f"{name}.lora_b"]
    scale = alpha / lora_b.shape[1]
    if name == "token_embd.weight":  # rows of A (vocab x r) times B^T: (vocab, hidden)
        return scale * (lora_a @ lora_b.T)
    return scale * (lora_b @ lora_a)


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"k_proj": 3, "up_proj": 20}),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_llama_cpp_applies_what_lorafit_adds(tmp_path, case):
    config = LoraConfig(target_modules=LINEAR + ["embed_tokens", "lm_head"], init_lora_weights=False, **CONFIGS[case])
    lora = save_lora(tiny_llama(), config, tmp_path / "adapter")
    result = export_gguf_adapter(lora, tmp_path / "adapter", tmp_path / "a.gguf")
    fields, values, types = read_adapter_gguf(tmp_path / "a.gguf")

    assert (fields["general.architecture"], fields["general.type"], fields["adapter.type"]) == ("llama", "adapter", "lora")
    assert fields["adapter.lora.alpha"] == 8.0
    assert set(types.values()) == {"F32"}
    expected_names = {f"blk.{b}.{t}.weight.lora_{ab}" for b in range(2) for ab in "ab"
                      for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    expected_names |= {f"{t}.weight.lora_{ab}" for t in ("token_embd", "output") for ab in "ab"}
    assert set(values) == expected_names and result.tensors == len(expected_names)

    base = lora.get_base_model()
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
    for block in range(2):
        for short, module in hf_names.items():
            delta = llama_cpp_delta(values, f"blk.{block}.{short}.weight", fields["adapter.lora.alpha"])
            if short in ("attn_q", "attn_k"):
                delta = reverse_permute(delta, 4, 4 if short == "attn_q" else 2)
            layer = base.get_submodule(f"model.layers.{block}.{module}")
            np.testing.assert_allclose(delta, layer.delta_weight("default").detach().numpy(), rtol=1e-5, atol=1e-6)
    embedding = llama_cpp_delta(values, "token_embd.weight", 8.0)
    np.testing.assert_allclose(embedding, base.model.embed_tokens.delta_weight("default").detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    head = llama_cpp_delta(values, "output.weight", 8.0)
    np.testing.assert_allclose(head, base.lm_head.delta_weight("default").detach().numpy(), rtol=1e-5, atol=1e-6)


def test_f16_and_q8_0_outtypes(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR, init_lora_weights=False)
    lora = save_lora(tiny_llama(), config, tmp_path / "adapter")
    exact = {}
    for outtype in ("f32", "f16", "q8_0"):
        export_gguf_adapter(lora, tmp_path / "adapter", tmp_path / f"{outtype}.gguf", outtype=outtype)
        _, exact[outtype], types = read_adapter_gguf(tmp_path / f"{outtype}.gguf")
        if outtype == "f16":
            assert set(types.values()) == {"F16"}
        if outtype == "q8_0":  # A's rows (32 or 64 inputs) quantize; B's rows (rank 4) cannot, and stay f16
            assert {types[n] for n in types if n.endswith("lora_a")} == {"Q8_0"}
            assert {types[n] for n in types if n.endswith("lora_b")} == {"F16"}
    for name, values in exact["f32"].items():
        np.testing.assert_allclose(exact["f16"][name], values, rtol=1e-3, atol=1e-4)
        # q8_0: per block of 32, a step of max|x| / 127
        np.testing.assert_allclose(exact["q8_0"][name], values, rtol=0, atol=np.abs(values).max() / 127)


def test_unsupported_outtype_and_architecture(tmp_path):
    lora = save_lora(tiny_llama(), LoraConfig(target_modules=["q_proj"]), tmp_path / "llama")
    with pytest.raises(LorafitError, match="--outtype must be one of f32, f16, q8_0"):
        export_gguf_adapter(lora, tmp_path / "llama", tmp_path / "a.gguf", outtype="q4_0")
    gpt2 = save_lora(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]), tmp_path / "gpt2")
    with pytest.raises(LorafitError, match="exports GGUF for .*llama.* not 'gpt2'"):
        export_gguf_adapter(gpt2, tmp_path / "gpt2", tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_lora_on_a_tied_head_is_refused(tmp_path):
    lora = save_lora(tiny_llama(tie_word_embeddings=True), LoraConfig(target_modules=["q_proj", "lm_head"]),
                     tmp_path / "adapter")
    with pytest.raises(LorafitError, match="ties to its input embedding.*--merged"):
        export_gguf_adapter(lora, tmp_path / "adapter", tmp_path / "a.gguf")


# --- the command ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return Path(save_tiny_model(tmp_path_factory.mktemp("base") / "model", "llama"))


def saved_adapter(tiny_base: Path, directory: Path, biased: bool = False, **config) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, **({"attention_bias": True} if biased else {}))
    lora_config = LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=str(tiny_base), init_lora_weights=False,
                             **{"target_modules": ["q_proj", "v_proj"], **config})
    save_lora(base, lora_config, directory)
    save_adapter_info(directory, {"task": "causal-lm", "base_model": str(tiny_base)})
    return directory


def test_command_writes_the_adapter_and_refuses_to_overwrite(tmp_path, capsys, tiny_base):
    adapter = saved_adapter(tiny_base, tmp_path / "adapter")
    out = tmp_path / "out" / "a.gguf"
    code, stdout, err = run_cli(capsys, "export", "--adapter", adapter, "--output", out, "--outtype", "f16")
    assert code == 0, err
    assert "GGUF LoRA adapter written to" in stdout and "--lora" in stdout
    written = out.read_bytes()
    assert read_adapter_gguf(out)[0]["adapter.type"] == "lora"

    code, _, err = run_cli(capsys, "export", "--adapter", adapter, "--output", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == written
    code, _, err = run_cli(capsys, "export", "--adapter", adapter, "--output", out, "--overwrite")
    assert code == 0, err
    assert out.read_bytes() != written  # f32 now
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.gguf"]  # no temporaries left


@pytest.mark.parametrize("case, fragments", [
    ("modules_to_save", ["holds 'lm_head.weight'", "fully trained module", "--merged"]),
    ("bias", ["a trained bias", "--merged"]),
    ("dora", ["uses DoRA", "--merged"]),
])
def test_what_a_gguf_adapter_cannot_carry_is_refused_in_one_line(tmp_path, capsys, tiny_base, case, fragments):
    config = {"modules_to_save": {"modules_to_save": ["lm_head"]}, "bias": {"bias": "all", "biased": True},
              "dora": {"use_dora": True}}[case]
    adapter = saved_adapter(tiny_base, tmp_path / "adapter", **config)
    code, _, err = run_cli(capsys, "export", "--adapter", adapter, "--output", tmp_path / "a.gguf")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--merged"], ["--merged needs the base model as a GGUF file", "--base-gguf"]),
    (["--ollama"], ["--ollama needs the base model as a GGUF file"]),
    (["--format", "tflite"], ["--format must be one of gguf, onnx"]),
    (["--format", "onnx", "--merged"], ["are for --format gguf"]),
    (["--outtype", "bf16"], ["--outtype must be one of f32, f16, q8_0"]),
    (["--outtype", "base"], ["('base' too with --merged)"]),
    (["--format", "onnx"], ["--format onnx exports classifiers; this is a causal-lm adapter", "--format gguf"]),
    (["--base-gguf", "missing.gguf", "--merged"], ["--base-gguf 'missing.gguf' is not a file"]),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, tiny_base, args, fragments):
    adapter = saved_adapter(tiny_base, tmp_path / "adapter")
    code, _, err = run_cli(capsys, "export", "--adapter", adapter, "--output", tmp_path / "a.gguf", *args)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize("task", ["token-classification", "seq2seq"])
@pytest.mark.parametrize("export_format", ["gguf", "onnx"])
def test_a_task_neither_format_carries_is_refused_without_pointing_to_the_other(tmp_path, capsys, tiny_base, task,
                                                                                export_format):
    adapter = saved_adapter(tiny_base, tmp_path / "adapter")
    save_adapter_info(adapter, {"task": task, "base_model": str(tiny_base)})
    code, _, err = run_cli(capsys, "export", "--adapter", adapter, "--output", tmp_path / "a.gguf",
                           "--format", export_format)
    assert_one_line_error(code, err, f"this is a {task} adapter", "lorafit merge")
    assert "use --format" not in err


def test_output_is_required(tmp_path, capsys, tiny_base):
    adapter = saved_adapter(tiny_base, tmp_path / "adapter")
    code, _, err = run_cli(capsys, "export", "--adapter", adapter)
    assert_one_line_error(code, err, "pass --output")


# --- the other architectures llama.cpp runs -------------------------------------------------------------

SEPARATE = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
FUSED = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
         "ffn_down": "mlp.down_proj"}
# architecture -> (llama.cpp's name for it, its tensors, whether Q/K rows are permuted)
OTHERS = {"mistral": ("llama", SEPARATE, True), "qwen2": ("qwen2", SEPARATE, False), "qwen3": ("qwen3", SEPARATE, False),
          "gemma2": ("gemma2", SEPARATE, False), "gemma3": ("gemma3", SEPARATE, False), "phi3": ("phi3", FUSED, False)}


@pytest.mark.parametrize("arch", sorted(OTHERS))
def test_other_architectures_get_llama_cpp_names(tmp_path, arch):
    from test_interop_architectures import build

    llama_arch, tensors, permuted = OTHERS[arch]
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lora = save_lora(build(arch), config, tmp_path / "adapter")
    export_gguf_adapter(lora, tmp_path / "adapter", tmp_path / "a.gguf")
    fields, values, _ = read_adapter_gguf(tmp_path / "a.gguf")
    assert fields["general.architecture"] == llama_arch
    assert set(values) == {f"blk.0.{short}.weight.lora_{ab}" for short in tensors for ab in "ab"}
    for short, module in tensors.items():
        delta = llama_cpp_delta(values, f"blk.0.{short}.weight", 8.0)
        if permuted and short in ("attn_q", "attn_k"):
            delta = reverse_permute(delta, 4, 4 if short == "attn_q" else 2)
        layer = lora.get_base_model().get_submodule(f"model.layers.0.{module}")
        np.testing.assert_allclose(delta, layer.delta_weight("default").detach().numpy(), rtol=1e-5, atol=1e-6)
