"""PiSSA and OLoRA (lorafit.variants.residual_init) against plain linear algebra and against the real `peft`.

With the same seed and base model, lorafit and PEFT 0.21 give the same initial factors and residual base
weights (pissa_niter's randomised SVD included: both draw from torch's generator in the same order). A
trained adapter moves between the two in both directions, and saving with
path_initial_model_for_weight_conversion writes PEFT's plain-LoRA file, which on the original base model
gives the fine-tuned model's logits (within 1e-5; the measured differences are below 1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama  # noqa: E402
from lorafit import LoraConfig, LoraModel, LorafitError, get_lora_model  # noqa: E402
from lorafit.serialization import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from test_cli import (assert_one_line_error, make_rows, run_cli, single_thread, tiny_bert3_dir,  # noqa: E402,F401
                      write_rows)
from test_interop import _quiet, logits, randomise_  # noqa: E402

ATOL = 1e-5

CASES = {
    "llama": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                    fan_in_fan_out=True)),
    "llama-rslora": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=4, use_rslora=True,
                                      target_modules=["q_proj", "o_proj"])),
}
# PEFT's OLoRA factors a Conv1D weight as stored, (in, out), and so gives factors that do not fit it
PAIRS = [(case, init) for case in CASES for init in ("pissa", "pissa_niter_2", "olora")
         if not (case == "gpt2-conv1d" and init == "olora")]


def build_both(case: str, init: str, seed: int = 5, **extra):
    """lorafit's and PEFT's model for one case, each created right after the same torch.manual_seed."""
    build, kwargs = CASES[case]
    base_ours, base_theirs = build(0), build(0)
    torch.manual_seed(seed)
    kwargs = {**kwargs, **extra}
    ours = get_lora_model(base_ours, LoraConfig(**kwargs, init_lora_weights=init))
    torch.manual_seed(seed)
    with _quiet():
        theirs = peft.get_peft_model(base_theirs, peft.LoraConfig(**kwargs, init_lora_weights=init))
    return ours, theirs


def plain_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the transformers model inside, by its name there without the adapter's name."""
    inner = model.model if isinstance(model, LoraModel) else model.base_model.model
    return {k.replace(".default", ""): v for k, v in inner.state_dict().items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- initialisation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,init", PAIRS)
def test_factors_and_residual_weights_equal_peft(case, init):
    ours, theirs = build_both(case, init)
    mine, peft_state = plain_state(ours), plain_state(theirs)
    assert sorted(mine) == sorted(peft_state)
    for key in mine:
        assert max_diff(mine[key], peft_state[key]) <= ATOL, key
    original = CASES[case][0](0).state_dict()
    changed = [k for k in mine if k.endswith("base_layer.weight")
               and max_diff(mine[k], original[k.replace(".base_layer", "")]) > 1e-3]
    assert changed, "the base weights did not change: test is void"


@pytest.mark.parametrize("case,init", PAIRS)
def test_a_fresh_adapter_leaves_the_output_unchanged(case, init):
    build, kwargs = CASES[case]
    batch = make_batch(vocab=100, batch=3, seq=9)
    expected = logits(build(0), batch)
    model = get_lora_model(build(0), LoraConfig(**kwargs, init_lora_weights=init))
    assert max_diff(logits(model, batch), expected) <= ATOL


def test_olora_on_conv1d_factors_the_weight_as_out_by_in():
    """W = Q R with Q orthonormal: B = Q_r, A = R_r, and the stored (in, out) weight keeps W - s B A."""
    model = get_lora_model(tiny_gpt2(0), LoraConfig(r=3, lora_alpha=6, target_modules=["c_fc"],
                                                    init_lora_weights="olora"))
    layer = model.model.transformer.h[0].mlp.c_fc
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = tiny_gpt2(0).transformer.h[0].mlp.c_fc.weight.T  # (out, in)
    assert A.shape == (3, W.shape[1]) and B.shape == (W.shape[0], 3)
    torch.testing.assert_close(B.T @ B, torch.eye(3), rtol=0, atol=1e-5)
    assert torch.count_nonzero(torch.tril(A[:, :3], diagonal=-1)) == 0  # R is upper triangular
    torch.testing.assert_close(layer.base_layer.weight.T + 2.0 * B @ A, W, rtol=0, atol=1e-5)


def test_pissa_takes_the_top_singular_values_and_leaves_the_rest():
    model = get_lora_model(tiny_llama(0), LoraConfig(r=3, lora_alpha=6, target_modules=["gate_proj"],
                                                     init_lora_weights="pissa"))
    layer = model.model.model.layers[0].mlp.gate_proj
    singular = torch.linalg.svdvals(tiny_llama(0).model.layers[0].mlp.gate_proj.weight)
    update = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(torch.linalg.svdvals(update)[:3], singular[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:5], singular[3:8], rtol=1e-5, atol=1e-6)


def test_embeddings_keep_the_usual_start_as_in_peft():
    ours, theirs = build_both("llama", "pissa", target_modules=["embed_tokens", "q_proj"])
    mine, peft_state = plain_state(ours), plain_state(theirs)
    for key in ("model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B",
                "model.embed_tokens.base_layer.weight"):
        assert max_diff(mine[key], peft_state[key]) <= ATOL, key
    assert not mine["model.embed_tokens.lora_embedding_A"].any()


@pytest.mark.parametrize("init", ["PiSSA", "pissa_niter_", "pissa_niter_x", "svd", 1])
def test_other_values_are_refused(init):
    with pytest.raises(ValueError, match="init_lora_weights must be one of .*'pissa_niter_<K>'"):
        LoraConfig(init_lora_weights=init)


# --- trained adapters, both directions ----------------------------------------------------------------
def trained_pair(case: str, init: str, tmp_path, **extra):
    """(ours, theirs) after the same 'training' (PEFT's factors randomised and copied into ours), with each
    one's initial adapter saved to tmp_path/ours-init and tmp_path/peft-init first."""
    ours, theirs = build_both(case, init, **extra)
    ours.save_pretrained(tmp_path / "ours-init")
    with _quiet():
        theirs.save_pretrained(str(tmp_path / "peft-init"))
    randomise_(theirs)
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return ours, theirs


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_trained_adapter_loads_onto_the_original_base_both_ways(init, tmp_path):
    """Unconverted, an adapter records its initialisation, and loading re-derives the residual (PEFT's way)."""
    ours, theirs = trained_pair("llama", init, tmp_path)
    batch = make_batch(vocab=100, batch=3, seq=9)
    expected = logits(theirs, batch)
    assert max_diff(logits(ours, batch), expected) <= ATOL
    assert max_diff(logits(tiny_llama(0), batch), expected) > 1e-3, "adapter is a no-op: test is void"
    ours.save_pretrained(tmp_path / "ours")
    with _quiet():
        theirs.save_pretrained(str(tmp_path / "theirs"))
        peft_loaded = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "ours"))
    assert max_diff(logits(peft_loaded, batch), expected) <= ATOL
    ours_loaded = LoraModel.from_pretrained(tiny_llama(0), tmp_path / "theirs")
    assert ours_loaded.peft_config["default"].init_lora_weights == init
    assert max_diff(logits(ours_loaded, batch), expected) <= ATOL


@pytest.mark.parametrize("case,init", [("llama", "pissa"), ("llama", "pissa_niter_2"), ("llama", "olora"),
                                       ("gpt2-conv1d", "pissa"), ("llama-rslora", "pissa")])
def test_conversion_writes_peft_file_which_gives_the_trained_model_on_the_original_base(case, init, tmp_path):
    build, kwargs = CASES[case]
    ours, theirs = trained_pair(case, init, tmp_path)
    batch = make_batch(vocab=100, batch=3, seq=9)
    expected = logits(theirs, batch)
    ours.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours-init")
    with _quiet():
        theirs.save_pretrained(str(tmp_path / "theirs"),
                               path_initial_model_for_weight_conversion=str(tmp_path / "peft-init"))
    mine, peft_file = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert sorted(mine) == sorted(peft_file)
    for key in mine:
        assert max_diff(mine[key], peft_file[key]) <= ATOL, key
    config, peft_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    for field in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert config[field] == pytest.approx(peft_config[field]), field
    assert config["r"] == 2 * kwargs["r"] and config["init_lora_weights"] is True

    with _quiet():
        peft_loaded = peft.PeftModel.from_pretrained(build(0), str(tmp_path / "ours"))
    ours_loaded = LoraModel.from_pretrained(build(0), tmp_path / "theirs")
    assert max_diff(logits(peft_loaded, batch), expected) <= ATOL
    assert max_diff(logits(ours_loaded, batch), expected) <= ATOL
    assert max_diff(logits(build(0), batch), expected) > 1e-3, "adapter is a no-op: test is void"


def test_conversion_keeps_the_head_embedding_factors_and_original_lm_head(tmp_path):
    """Everything besides the LoRA factors is kept (PEFT's conversion drops it, so its file loses the trained
    head); a targeted lm_head's saved base weight is the original one again."""
    cases = [(tiny_bert_cls, dict(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])),
             (tiny_llama, dict(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                               target_modules=["embed_tokens", "q_proj", "lm_head"]))]
    batch = make_batch(vocab=100, batch=3, seq=9)
    for i, (build, kwargs) in enumerate(cases):
        model = get_lora_model(build(0), LoraConfig(**kwargs, init_lora_weights="pissa"))
        model.save_pretrained(tmp_path / f"init{i}")
        randomise_(model)
        expected = logits(model, batch)
        model.save_pretrained(tmp_path / f"out{i}", path_initial_model_for_weight_conversion=tmp_path / f"init{i}")
        saved = load_file(str(tmp_path / f"out{i}" / "adapter_model.safetensors"))
        assert any("classifier" in k or "embed_tokens.lora_embedding" in k for k in saved)
        if "lm_head" in kwargs["target_modules"]:
            original = build(0).lm_head.weight
            assert max_diff(saved["base_model.model.lm_head.base_layer.weight"], original) <= 1e-6
        with _quiet():
            peft_loaded = peft.PeftModel.from_pretrained(build(0), str(tmp_path / f"out{i}"))
        assert max_diff(logits(peft_loaded, batch), expected) <= ATOL
        assert max_diff(logits(LoraModel.from_pretrained(build(0), tmp_path / f"out{i}"), batch), expected) <= ATOL


@pytest.mark.parametrize("extra,fragment", [(dict(use_dora=True), "DoRA adapter cannot be converted"),
                                            (dict(use_rslora=True, rank_pattern={"q_proj": 2}), "rsLoRA")])
def test_conversions_that_cannot_keep_the_model_are_refused(extra, fragment, tmp_path):
    model = get_lora_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="olora", **extra))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(LorafitError, match=fragment):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()


def test_an_initial_adapter_of_another_shape_is_refused(tmp_path):
    get_lora_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "other")
    model = get_lora_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="pissa"))
    with pytest.raises(LorafitError, match="initial adapter .* does not match the adapter being saved"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    assert not (tmp_path / "out").exists()


def test_loading_an_unconverted_pissa_niter_adapter_warns(tmp_path, recwarn):
    for init in ("pissa_niter_2", "pissa"):
        get_lora_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)) \
            .save_pretrained(tmp_path / init)
        LoraModel.from_pretrained(tiny_llama(0), tmp_path / init)
    warned = [str(w.message) for w in recwarn if "randomised SVD" in str(w.message)]
    assert len(warned) == 1 and "pissa_niter_2" in warned[0] and "path_initial_model_for_weight_conversion" in warned[0]


# --- the command line ---------------------------------------------------------------------------------------
def test_train_with_pissa_saves_a_plain_lora_that_gives_the_trained_model_on_the_base(tmp_path, capsys,
                                                                                      tiny_bert3_dir):
    """`lorafit train --init-lora-weights pissa`: best/ is the plain LoRA of rank 2r (PEFT loads it onto the
    unchanged base), equal to the trained adapter as its checkpoint holds it, loaded PEFT's way."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.inference.loading import load_adapter_for_inference

    train = write_rows(tmp_path / "train.jsonl", make_rows(16, ("neg", "neu", "pos"), seed=8))
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert3_dir, "--train-file", train, "--eval-strategy", "no",
                           "--save-strategy", "steps", "--save-steps", "2", "--max-steps", "2", "--max-length", "32",
                           "--batch-size", "8", "--lr", "0.01", "--r", "4", "--init-lora-weights", "pissa",
                           "--output-dir", tmp_path / "run")
    assert code == 0, err
    run = tmp_path / "run"
    best, initial = (json.loads((run / d / "adapter_config.json").read_text()) for d in ("best", "initial_adapter"))
    assert (best["r"], best["init_lora_weights"]) == (8, True)
    assert (initial["r"], initial["init_lora_weights"]) == (4, "pissa")
    assert "initial_adapter/" in (run / "README.md").read_text()

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert3_dir)
    batch = tokenizer(["a great film", "dull and slow", "fine"], padding=True, return_tensors="pt")

    def scores(model):
        with torch.no_grad(), single_thread():
            return model.eval()(**batch).logits

    def base():
        with single_thread():
            return AutoModelForSequenceClassification.from_pretrained(tiny_bert3_dir)

    trained = scores(LoraModel.from_pretrained(base(), run / "checkpoint-2" / "adapter"))  # re-derives W_res
    assert max_diff(scores(base()), trained) > 1e-4, "training changed nothing: test is void"
    with _quiet():
        assert max_diff(scores(peft.PeftModel.from_pretrained(base(), str(run / "best"))), trained) <= ATOL
    assert max_diff(scores(load_adapter_for_inference(run / "best").model), trained) <= ATOL
    code, out, err = run_cli(capsys, "predict", "--adapter", run / "best", "a great film")
    assert code == 0 and out.strip(), err


@pytest.mark.parametrize("argv,fragments", [
    (["--init-lora-weights", "pissa_niter"], ["--init-lora-weights must be", "pissa_niter_<K>"]),
    (["--init-lora-weights", "olora", "--use-dora"], ["--use-dora with --init-lora-weights olora", "drop one"]),
])
def test_train_refuses_bad_init_settings_in_one_line(argv, fragments, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *argv, "--output-dir", tmp_path / "run")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("first,second", [("pissa", True), (True, "olora")])
def test_an_adapter_that_changed_the_base_shares_the_model_with_no_other(first, second, tmp_path):
    model = get_lora_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=first))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorafitError, match="changed the base weights, so it cannot share the model"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=second))
    assert list(model.peft_config) == ["default"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    if first == "pissa":  # nor can it be combined with itself: the result would apply to the residual only
        with pytest.raises(LorafitError, match="cannot share the model"):
            model.add_weighted_adapter(["default"], [0.5], "half", combination_type="linear")


def test_a_resumed_pissa_niter_run_saves_the_same_best(tmp_path, capsys, tiny_bert3_dir):
    """The randomised SVD is drawn again from the run's seed, so a resume continues from the same residual."""
    import shutil

    train = write_rows(tmp_path / "train.jsonl", make_rows(16, ("neg", "neu", "pos"), seed=8))
    argv = ["train", "--model", tiny_bert3_dir, "--train-file", train, "--eval-strategy", "no", "--save-strategy",
            "steps", "--save-steps", "2", "--max-steps", "4", "--max-length", "32", "--batch-size", "8", "--lr", "0.01",
            "--r", "4", "--init-lora-weights", "pissa_niter_2", "--output-dir", tmp_path / "run"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    run = tmp_path / "run"
    first = load_file(str(run / "best" / "adapter_model.safetensors"))
    # as if killed after checkpoint-2
    for done in ("best", "checkpoint-4"):
        shutil.rmtree(run / done)
    (run / "README.md").unlink()
    code, out, err = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "Resuming from checkpoint-2" in out, err
    again = load_file(str(run / "best" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(first)
    for key in first:
        assert max_diff(again[key], first[key]) <= 1e-6, key
