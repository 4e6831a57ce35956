"""Seq2seq fine-tuning (tasks/seq2seq.py, data/seq2seq.py): `lorafit train --task seq2seq`, eval and generate.

A tiny random T5 with a byte-level BPE tokenizer trained here (offline) learns the to-do task of
test_causal_lm.py as input/target pairs; PEFT and transformers, loading the run's adapter on their
own, are the reference for its logits and for what `lorafit generate` writes.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import transformers

from test_causal_lm import build_tokenizer, todo_records, write_jsonl
from test_cli import assert_one_line_error, run_cli

from lorafit.data import seq2seq as pair_data
from lorafit.data.readers import read_table
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.tasks.pipeline import run_train
from lorafit.training.settings import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def pair_records() -> list[dict]:
    return [{"input": r["prompt"], "target": r["response"]} for r in todo_records()]


def save_tiny_t5(directory) -> str:
    """A random T5 (2 layers, d_model 32) and a tokenizer that ends every text with </s>, as T5's does."""
    from tokenizers import processors

    tokenizer = build_tokenizer(chat=False)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.convert_tokens_to_ids("</s>"))])
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    transformers.T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """One short training run, shared by the checks on its outputs."""
    root = tmp_path_factory.mktemp("seq2seq-run")
    records = pair_records()
    validation = records[::6]
    train = [r for r in records if r not in validation]
    config = TrainConfig(task="seq2seq", model=save_tiny_t5(root / "model"),
                         train_file=write_jsonl(root / "train.jsonl", train),
                         validation_file=write_jsonl(root / "validation.jsonl", validation), max_length=32,
                         lr=3e-2, batch_size=8, max_steps=48, eval_strategy="steps", eval_steps=16, lora_dropout=0.0,
                         target_modules=["all-linear"], output_dir=str(root / "out"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads, and lose a lot on a busy machine
    try:
        final = run_train(config)
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(root=root, out=root / "out", best=root / "out" / "best", final=final,
                                 model_dir=root / "model", validation=root / "validation.jsonl")


def test_training_lowers_the_loss_and_writes_a_seq2seq_adapter(t5_run):
    history = [json.loads(line) for line in (t5_run.out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.8
    assert history[-1]["loss"] < history[0]["loss"]
    info = json.loads((t5_run.best / "lorafit.json").read_text())
    assert info["task"] == "seq2seq" and info["input_column"] == "input" and info["target_column"] == "target"
    assert json.loads((t5_run.best / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    assert {"heldout_exact_match_before", "heldout_exact_match_after", "validation_loss",
            "validation_perplexity", "train_tokens_per_second"} <= t5_run.final.keys()


def test_peft_loads_the_run_adapter_and_generate_writes_what_peft_generates(t5_run, capsys, tmp_path):
    from peft import PeftModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(t5_run.best / "tokenizer")
    peft_model = PeftModel.from_pretrained(
        transformers.AutoModelForSeq2SeqLM.from_pretrained(t5_run.model_dir), str(t5_run.best)).eval()
    inputs = [r["input"] for r in pair_records()[:5]]
    encoded = tokenizer(inputs, return_tensors="pt", padding=True)
    labels = tokenizer(text_target=[r["target"] for r in pair_records()[:5]], return_tensors="pt", padding=True)
    loaded = load_adapter_for_inference(t5_run.best)
    with torch.no_grad():
        batch = {**encoded, "labels": labels["input_ids"]}
        torch.testing.assert_close(loaded.model(**batch).logits, peft_model(**batch).logits, atol=1e-5, rtol=0)
        expected = [tokenizer.decode(peft_model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=12,
                                                         do_sample=False)[0], skip_special_tokens=True)
                    for text in inputs]

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in inputs])
    code, _, err = run_cli(capsys, "generate", "--adapter", t5_run.best, "--input", tmp_path / "prompts.jsonl",
                           "--output", tmp_path / "out.jsonl", "--max-new-tokens", "12", "--batch-size", "3")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["response"] for row in rows] == expected
    assert any(row["response"] for row in rows)


def test_generate_mixes_adapters_and_the_base_in_one_batch(t5_run, capsys, tmp_path):
    inputs = [r["input"] for r in pair_records()[:4]]
    write_jsonl(tmp_path / "base.jsonl", [{"prompt": text, "adapter": "__base__"} for text in inputs])
    write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": text, "adapter": name}
                                           for text, name in zip(inputs, ["__base__", "todo", "todo", "__base__"])])
    outputs = {}
    for name in ("base", "mixed"):
        code, _, err = run_cli(capsys, "generate", "--adapter", f"todo={t5_run.best}", "--input",
                               tmp_path / f"{name}.jsonl", "--output", tmp_path / f"{name}-out.jsonl",
                               "--max-new-tokens", "12")
        assert code == 0, err
        written = (tmp_path / f"{name}-out.jsonl").read_text().splitlines()
        outputs[name] = [json.loads(line)["response"] for line in written]
    write_jsonl(tmp_path / "plain.jsonl", [{"prompt": text} for text in inputs])
    code, _, err = run_cli(capsys, "generate", "--adapter", t5_run.best, "--input", tmp_path / "plain.jsonl",
                           "--output", tmp_path / "adapter-out.jsonl", "--max-new-tokens", "12")
    assert code == 0, err
    tuned = [json.loads(line)["response"] for line in (tmp_path / "adapter-out.jsonl").read_text().splitlines()]
    assert outputs["mixed"] == [outputs["base"][0], tuned[1], tuned[2], outputs["base"][3]]
    assert outputs["base"] != tuned


def test_generate_refuses_adapters_of_two_kinds_together(t5_run, capsys, tmp_path):
    import shutil

    causal = tmp_path / "causal"
    shutil.copytree(t5_run.best, causal)
    info = json.loads((causal / "lorafit.json").read_text())
    (causal / "lorafit.json").write_text(json.dumps({**info, "task": "causal-lm"}))
    code, _, err = run_cli(capsys, "generate", "--adapter", f"a={t5_run.best}", "--adapter", f"b={causal}", "hi")
    assert_one_line_error(code, err, "is a causal-lm adapter", "is a seq2seq adapter", "of one kind")


def test_eval_command_prints_the_runs_validation_loss(t5_run, capsys):
    code, out, err = run_cli(capsys, "eval", "--adapter", t5_run.best, "--data", t5_run.validation, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["loss"] == pytest.approx(t5_run.final["validation_loss"], abs=1e-4)
    assert metrics["examples"] == len(pair_records()[::6]) and metrics["tokens"] > 0


def test_merge_writes_a_plain_seq2seq_model_with_the_adapter_logits(t5_run, capsys, tmp_path):
    code, _, err = run_cli(capsys, "merge", "--adapter", t5_run.best, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "T5ForConditionalGeneration"
    loaded = load_adapter_for_inference(t5_run.best)
    tokenizer = loaded.tokenizer
    batch = {**tokenizer(["Ann must pay rent."], return_tensors="pt"),
             "labels": tokenizer(text_target=["TODO(ann): pay rent"], return_tensors="pt")["input_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, loaded.model(**batch).logits, atol=1e-5, rtol=0)


def test_predict_points_to_generate(t5_run, capsys):
    code, _, err = run_cli(capsys, "predict", "--adapter", t5_run.best, "a text")
    assert_one_line_error(code, err, "seq2seq adapter", "lorafit generate")


# --- data ---------------------------------------------------------------------------------------------
def test_pairs_tokenize_with_end_tokens_and_pad_labels_with_minus_100(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(save_tiny_t5(tmp_path / "t5"))
    table = read_table(write_jsonl(tmp_path / "d.jsonl", pair_records()[:2]))
    pairs = pair_data.pairs_from_table(table, "d.jsonl", "input", "target")
    examples = pair_data.tokenize_pairs(pairs, tokenizer, role="training", max_length=64)
    for example, record in zip(examples, pair_records()[:2]):
        assert example["labels"] == tokenizer(record["target"], add_special_tokens=False)["input_ids"] + [2]
    batch = pair_data.make_seq2seq_collator(0)(examples)
    longest = max(len(e["labels"]) for e in examples)
    for row, example in enumerate(examples):
        assert batch["labels"][row].tolist() == example["labels"] + [-100] * (longest - len(example["labels"]))
    cut = pair_data.tokenize_pairs(pairs, tokenizer, role="training", max_length=4)
    assert all(len(e["input_ids"]) == 4 and e["input_ids"][-1] == 2 for e in cut)


@pytest.mark.parametrize("case, rows, args, fragments", [
    ("no column", [{"text": "a", "target": "b"}], [], ["no column 'input'", "--input-column"]),
    ("empty target", [{"input": "a", "target": "b"}, {"input": "c", "target": " "}], [],
     ["row 2 of 'train.jsonl'", "'target'"]),
    ("no model", [{"input": "a", "target": "b"}], ["--model", None], ["--model", "encoder-decoder"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, rows, args, fragments):
    model = save_tiny_t5(tmp_path / "t5") if args != ["--model", None] else None
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    flags = ["--model", model] if model else []
    code, _, err = run_cli(capsys, "train", "--task", "seq2seq", "--train-file", train, *flags,
                           "--output-dir", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()
