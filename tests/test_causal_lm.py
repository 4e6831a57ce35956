"""Causal-LM fine-tuning: the head-only-where-trained loss, generation, `lorafit train/eval --task causal-lm`.

Fast tests use tiny random Llama/GPT-2 models and a byte-level BPE tokenizer trained here, offline;
the one slow test runs a few real steps on SmolLM2.
"""

from __future__ import annotations

import json
import re
import types
from importlib import resources
from pathlib import Path

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from lorafit.tasks import causal_lm as causal
from lorafit.fast import causal_loss
from lorafit.data import chat as lm_data
from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.inference.generate import GenerationSettings, decode_reply, generate_replies, stop_token_ids
from lorafit.tasks.pipeline import lora_targets, run_train
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.model import LoraModel, get_lora_model
from lorafit.training.settings import TrainConfig

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4, as the tiny configs expect
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMES = ["ann", "bob", "cleo", "dan", "eve", "finn", "gus", "hana"]
TASKS = ["buy milk", "call mum", "pay rent", "walk the dog", "fix the bike", "book a table"]
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# With the default 0.02 a frozen random head can only spread logits by about 1, so no adapter could lower the loss much.
INIT_RANGE = 0.3


def todo_records() -> list[dict]:
    """A tiny version of the built-in task: a request in, a to-do line in a fixed format out."""
    return [{"prompt": f"{name.capitalize()} must {task}.", "response": f"TODO({name}): {task}"}
            for name in NAMES for task in TASKS]


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def build_tokenizer(chat: bool):
    """A byte-level BPE tokenizer trained on the tiny task's text (with a ChatML template if ``chat``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"### Instruction:\n{r['prompt']}\n\n### Response:\n{r['response']} user assistant"
             for r in todo_records()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens=SPECIALS[3:])
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(directory: Path, arch: str, head: bool = True) -> str:
    """A tiny model + tokenizer directory that `--model` accepts (llama: chat template; gpt2: fallback template).

    ``head=False`` saves the body alone (LlamaModel), so loading it as a causal LM makes a new, untied LM head."""
    tokenizer = build_tokenizer(chat=arch == "llama")
    model = BUILDERS[arch](vocab_size=len(tokenizer), initializer_range=INIT_RANGE)
    for key, value in {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.items():
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    if head:
        model.save_pretrained(directory)
    else:
        model.get_decoder().save_pretrained(directory)
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def random_batch(seed: int = 0, vocab: int = 100) -> dict:
    """Right-padded rows with a masked prompt, as the LM collator makes them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 6:] = 0, 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_wrapped(arch: str, seed: int = 0) -> LoraModel:
    """A tiny model with a non-zero adapter on every linear layer, so LoRA changes the outputs."""
    config = LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False, target_modules="all-linear")
    return get_lora_model(BUILDERS[arch](seed=seed), config)


def lora_grads(model: LoraModel) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


# --- loss -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_loss_and_gradients_match_transformers_loss(arch):
    assert_matches_transformers_loss(lora_wrapped(arch), random_batch())


def assert_matches_transformers_loss(model, batch: dict) -> None:
    """causal_loss and its LoRA gradients equal transformers' own ``labels=`` loss and its gradients."""
    expected = model(**batch).loss
    expected.backward()
    expected_grads = lora_grads(model)
    ours = causal.causal_loss(model, batch)
    ours.backward()
    grads = lora_grads(model)
    assert abs(ours.item() - expected.item()) < 1e-5
    assert expected_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def shared_prefix_batch(prefix: int = 10, seed: int = 3, vocab: int = 100) -> dict:
    """Three rows that open with the same ``prefix`` tokens (a system prompt), then differ; right-padded."""
    batch = random_batch(seed=seed, vocab=vocab)
    batch["input_ids"][:, :prefix] = batch["input_ids"][0, :prefix]
    batch["labels"][:, :prefix + 1] = -100
    batch["attention_mask"][1, 9:] = 1  # keep the prefix unpadded in every row
    batch["attention_mask"][2, 6:] = 1
    batch["attention_mask"][2, 11:] = 0
    batch["input_ids"][2, 11:] = 0
    batch["labels"][2, 11:] = -100
    return batch


def test_gradient_checkpointing_through_the_body_gives_the_same_gradients():
    assert_checkpointing_keeps_gradients(random_batch(seed=2))


def assert_checkpointing_keeps_gradients(batch: dict) -> None:
    """A tiny Llama's LoRA gradients from causal_loss are the same with gradient checkpointing on."""
    model = lora_wrapped("llama").train()
    causal.causal_loss(model, batch).backward()
    plain = lora_grads(model)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    causal.causal_loss(model, batch).backward()
    grads = lora_grads(model)
    assert grads.keys() == plain.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_sequences_score_as_separate_examples(arch):
    model = lora_wrapped(arch)
    a, b = torch.arange(10, 17), torch.arange(30, 35)
    label_a, label_b = a.clone(), b.clone()
    label_a[:3], label_b[:2] = -100, -100
    packed = {"input_ids": torch.cat([a, b, torch.zeros(2, dtype=torch.long)])[None],
              "labels": torch.cat([label_a, label_b, torch.full((2,), -100)])[None],
              "attention_mask": torch.tensor([[1] * 12 + [0, 0]]),
              "position_ids": torch.tensor([list(range(7)) + list(range(5)) + [0, 0]])}
    with torch.no_grad():
        sum_a, n_a = causal.response_nll(model, {"input_ids": a[None], "labels": label_a[None]})
        sum_b, n_b = causal.response_nll(model, {"input_ids": b[None], "labels": label_b[None]})
        total, count = causal.response_nll(model, packed)
    assert int(count) == int(n_a + n_b) == 7
    assert abs(total.item() - (sum_a + sum_b).item()) < 1e-4


def test_wrapped_model_falls_back_to_the_full_forward():
    """A model hidden behind a wrapper (as DistributedDataParallel hides it) is called, not bypassed."""
    model = lora_wrapped("llama")

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    batch = random_batch(seed=1)
    with torch.no_grad():
        assert abs(causal.causal_loss(Wrapper(model), batch).item() - model(**batch).loss.item()) < 1e-5


# --- generation ----------------------------------------------------------------------------------------
def test_stop_tokens_include_the_chat_templates_end_of_turn():
    tokenizer = build_tokenizer(chat=True)
    ids = stop_token_ids(tiny_llama(vocab_size=len(tokenizer)), tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids and tokenizer.eos_token_id in ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_generation_with_left_padding_matches_one_at_a_time(arch):
    tokenizer = build_tokenizer(chat=arch == "llama")
    model = lora_wrapped(arch)
    model.model.resize_token_embeddings(len(tokenizer))
    prompts = ["Ann must buy milk.", "Bob must walk the dog on a very long and winding road today.", "Eve must pay rent."]
    settings = GenerationSettings(max_new_tokens=6, batch_size=32)
    together = generate_replies(model, tokenizer, prompts, settings)
    alone = [generate_replies(model, tokenizer, [p], settings)[0] for p in prompts]
    assert together == alone
    assert all(isinstance(reply, str) for reply in together) and any(together)


def test_exact_match_ignores_surrounding_whitespace():
    assert causal.exact_match([" TODO(a): x\n", "TODO(b): y"], ["TODO(a): x", "TODO(b): z"]) == 0.5


def test_decode_reply_stops_at_the_first_stop_token():
    tokenizer = build_tokenizer(chat=True)
    ids = tokenizer("TODO(ann): buy milk", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert decode_reply(tokenizer, ids + [end] + ids, [end]) == "TODO(ann): buy milk"


# --- lorafit train / eval ----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_run(request, tmp_path_factory):
    """One short training run per architecture, shared by the checks on its outputs."""
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    records = todo_records()
    validation = [records[i] for i in range(0, len(records), 6)]
    train = [r for r in records if r not in validation]
    config = TrainConfig(task="causal-lm", model=save_tiny_model(root / "model", request.param),
                         train_file=write_jsonl(root / "train.jsonl", train),
                         validation_file=write_jsonl(root / "validation.jsonl", validation),
                         max_length=64, lr=1e-2, batch_size=8, max_steps=20, eval_strategy="steps", eval_steps=5,
                         lora_dropout=0.0, target_modules=["all-linear"], output_dir=str(root / "out"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads, and lose a lot on a busy machine
    try:
        final = run_train(config)
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(arch=request.param, root=root, out=root / "out", final=final,
                                 model_dir=root / "model", validation=root / "validation.jsonl")


def test_training_lowers_the_loss_and_writes_the_run_folder(tiny_run):
    history = [json.loads(line) for line in (tiny_run.out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.7
    assert min(r["loss"] for r in history) < history[0]["loss"]
    best = tiny_run.out / "best"
    for name in ("adapter_config.json", "adapter_model.safetensors", "lorafit.json", "tokenizer/tokenizer.json"):
        assert (best / name).is_file(), name
    info = json.loads((best / "lorafit.json").read_text())
    assert info["task"] == "causal-lm" and info["max_length"] == 64 and info["chat"] == (tiny_run.arch == "llama")
    assert json.loads((best / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    for name in ("config.yaml", "README.md", "curves.png"):
        assert (tiny_run.out / name).is_file(), name
    final = tiny_run.final
    assert {"heldout_exact_match_before", "heldout_exact_match_after", "train_tokens_per_second",
            "peak_rss_mb", "validation_loss", "validation_perplexity"} <= final.keys()
    assert final["validation_loss"] == pytest.approx(min(r["loss"] for r in history), abs=1e-4)


def test_peft_loads_the_adapter_with_equal_logits(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = load_adapter_for_inference(tiny_run.out / "best")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_run.model_dir),
                                           str(tiny_run.out / "best")).eval()
    batch = random_batch(seed=3, vocab=len(loaded.tokenizer))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours, theirs = loaded.model(**inputs).logits, peft_model(**inputs).logits
        with peft_model.disable_adapter():
            base = peft_model(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, base, atol=1e-4)  # the adapter learned something


def test_eval_scores_response_tokens_of_a_file(tiny_run):
    from lorafit.data.classification import read_table

    loaded = load_adapter_for_inference(tiny_run.out / "best")
    table = read_table(tiny_run.validation)
    metrics = causal.evaluate_causal_file(loaded, table, batch_size=4)
    assert metrics["loss"] == pytest.approx(tiny_run.final["validation_loss"], abs=1e-4)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-3)
    assert metrics["examples"] == len(table) and metrics["tokens"] > 0


def test_eval_command_prints_loss_and_perplexity(tiny_run, capsys):
    from lorafit.cli import main

    argv = ["eval", "--adapter", str(tiny_run.out / "best"), "--data", str(tiny_run.validation), "--batch-size", "4"]
    assert main(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["loss"] == pytest.approx(tiny_run.final["validation_loss"], abs=1e-4) and "_text" not in shown


@pytest.mark.parametrize("records, targets, message", [
    ([{"question": "q", "answer": "a"}], None, "cannot tell the data format"),
    (todo_records()[:4], ["no_such_module"], "matched nothing"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, records, targets, message):
    config = TrainConfig(task="causal-lm", model=save_tiny_model(tmp_path / "model", "llama"),
                         train_file=write_jsonl(tmp_path / "train.jsonl", records), target_modules=targets,
                         output_dir=str(tmp_path / "out"))
    with pytest.raises(LorafitError, match=message):
        run_train(config)
    assert not (tmp_path / "out").exists()


def test_cut_examples_are_reported(tmp_path, capsys):
    tokenizer = build_tokenizer(chat=True)
    records = todo_records()[:4] + [{"prompt": "Ann must buy milk.", "response": "TODO(ann): " + "buy milk, " * 20}]
    examples = lm_data.tokenize_split(records, tokenizer, split="train", max_length=40)
    assert len(examples) == 5 and max(len(e["input_ids"]) for e in examples) == 40
    assert "1 of 5 training examples were longer than --max-length 40 and were cut" in capsys.readouterr().err


@pytest.mark.parametrize("pack", [False, True])
def test_training_starts_by_saying_what_was_loaded(tmp_path, capsys, pack):
    from test_cli import run_cli

    records = todo_records()
    train = write_jsonl(tmp_path / "train.jsonl", records[:40])
    validation = write_jsonl(tmp_path / "dev.jsonl", [{"text": r["prompt"]} for r in records[40:]])
    code, out, err = run_cli(capsys, "train", "--task", "causal-lm", "--model", save_tiny_model(tmp_path / "m", "gpt2"),
                             "--train-file", train, "--validation-file", validation, "--max-length", "64",
                             "--max-steps", "1", "--output-dir", tmp_path / "run", *(["--pack"] if pack else []))
    assert code == 0, err
    summary = out[:out.index("trainable params")]
    assert f"train: `{train}`" in summary and f"validation: `{validation}`" in summary
    if pack:  # 40 pairs of 20-odd tokens: a few to each 64-token sequence
        found = re.search(r"  train: 40 examples \(prompt-response\), packed into (\d+) sequences of up to 64 tokens\n",
                          summary)
        assert found and 5 < int(found.group(1)) < 40, summary
    else:
        assert "  train: 40 examples (prompt-response)\n" in summary
    assert "  validation: 8 examples (text)\n" in summary


def test_all_linear_flag_becomes_the_keyword():
    assert lora_targets(TrainConfig(task="causal-lm", target_modules=["all-linear"])) == "all-linear"
    assert lora_targets(TrainConfig(task="causal-lm", target_modules=["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    assert lora_targets(TrainConfig(task="causal-lm")) is None


# --- the real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_real_run_on_smollm2(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.inference.base_models import resolve_model

    builtin = resources.files("lorafit") / "builtin_data" / "instruct" / "train.jsonl"
    records = [json.loads(line) for line in builtin.read_text(encoding="utf-8").splitlines()]
    config = TrainConfig(task="causal-lm", train_file=write_jsonl(tmp_path / "train.jsonl", records[:16]),
                         validation_file=write_jsonl(tmp_path / "validation.jsonl", records[16:20]),
                         max_length=128, batch_size=4, max_steps=6, eval_strategy="steps", eval_steps=3, lr=2e-3,
                         output_dir=str(tmp_path / "out"))
    final = run_train(config)
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"]
    assert "heldout_exact_match_after" in final
    # the held-out replies train showed are the ones `lorafit generate` gives (same batch, same budget)
    shown = re.findall(r"generated: (.*?)\nexpected:", capsys.readouterr().out.split("after training")[1], re.S)
    loaded = load_adapter_for_inference(tmp_path / "out" / "best")
    budget = max(len(loaded.tokenizer(r["response"], add_special_tokens=False)["input_ids"])
                 for r in records[16:20]) + 8
    from lorafit.cli import main

    assert main(["generate", "--adapter", str(tmp_path / "out" / "best"), "--input", config.validation_file,
                 "--output", str(tmp_path / "replies.jsonl"), "--max-new-tokens", str(budget)]) == 0
    generated = [json.loads(line)["response"] for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert len(shown) == 3 and shown == [reply.strip() for reply in generated[:3]]
    replies = generate_replies(loaded.model, loaded.tokenizer, [records[30]["prompt"]], GenerationSettings(max_new_tokens=16))
    assert replies[0].strip()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("smollm2")),
                                           str(tmp_path / "out" / "best")).eval()
    ids = loaded.tokenizer("Zara must water the plants.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


# --- packing: block-diagonal attention -------------------------------------------------------------------
# Tolerance for "the same logits": fp32 on CPU, the packed and lone runs differ only in reduction order.
PACK_ATOL = 1e-5


def packed_examples(seed: int = 0, lengths=((7, 5, 4), (9, 6))) -> tuple[list[dict], list[list[dict]]]:
    """Examples of random tokens (the first two of each unscored) and their packs, one pack per inner tuple."""
    generator = torch.Generator().manual_seed(seed)
    examples, packs = [], []
    for group in lengths:
        members = []
        for length in group:
            ids = torch.randint(3, 100, (length,), generator=generator).tolist()
            members.append({"input_ids": ids, "labels": [-100, -100] + ids[2:], "attention_mask": [1] * length})
        examples += members
        packs.append(members)
    return examples, packs


def packed_batch(packs: list[list[dict]]) -> dict:
    """The training collator's batch of the packs (each one row, the shorter right-padded)."""
    rows = [lm_data.pack_examples(members, max_length=64)[0] for members in packs]
    return lm_data.make_lm_collator(0)(rows)


def logits_of(model, batch: dict) -> torch.Tensor:
    """The logits the training loss's forward call sees (causal_loss.model_inputs)."""
    with torch.no_grad():
        return model(**causal_loss.model_inputs(batch)).logits


def per_example_logits(model, examples: list[dict], packs: list[list[dict]]) -> list[torch.Tensor]:
    """Each example's logits inside the packed batch, cut out of its row."""
    logits, out = logits_of(model, packed_batch(packs)), []
    for row, members in enumerate(packs):
        start = 0
        for member in members:
            out.append(logits[row, start:start + len(member["input_ids"])])
            start += len(member["input_ids"])
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_run_alone(attention):
    model = lora_wrapped("llama")
    model.get_base_model().set_attn_implementation(attention)
    examples, packs = packed_examples()
    for example, packed in zip(examples, per_example_logits(model, examples, packs)):
        alone = logits_of(model, {"input_ids": torch.tensor([example["input_ids"]])})[0]
        torch.testing.assert_close(packed, alone, atol=PACK_ATOL, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_cannot_see_each_other(attention):
    """Changing the first example of a pack changes its logits and no one else's."""
    model = lora_wrapped("llama")
    model.get_base_model().set_attn_implementation(attention)
    examples, packs = packed_examples()
    before = per_example_logits(model, examples, packs)
    packs[0][0]["input_ids"] = [(token + 7) % 97 + 3 for token in packs[0][0]["input_ids"]]
    after = per_example_logits(model, examples, packs)
    assert (after[0] - before[0]).abs().max() > 1e-3
    for changed, unchanged in zip(after[1:], before[1:]):
        torch.testing.assert_close(changed, unchanged, atol=1e-6, rtol=0)


def test_packed_batch_loss_is_the_sum_of_each_examples_loss():
    """The training loss (head at scored positions) over two packed rows equals the examples' losses alone."""
    model = lora_wrapped("llama")
    examples, packs = packed_examples(seed=1)
    with torch.no_grad():
        total, count = causal.response_nll(model, packed_batch(packs))
        alone = [causal.response_nll(model, {key: torch.tensor([example[key]]) for key in ("input_ids", "labels")})
                 for example in examples]
    assert int(count) == sum(int(n) for _, n in alone) == sum(len(e["input_ids"]) - 2 for e in examples)
    assert abs(total.item() - sum(nll.item() for nll, _ in alone)) < 1e-4


def test_packs_laid_in_one_row_give_the_same_loss():
    """Flash-attention splits a row at restarting positions only when the batch has one row, so packed rows go
    end to end for it; that layout's loss (checked here under SDPA) is the packed batch's."""
    model = lora_wrapped("llama")
    _, packs = packed_examples(seed=2)
    batch = packed_batch(packs)
    flat = causal_loss.one_row(batch)
    assert flat["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    with torch.no_grad():
        expected, expected_count = causal.response_nll(model, batch)
        total, count = causal.response_nll(model, flat)
    assert int(count) == int(expected_count)
    assert abs(total.item() - expected.item()) < 1e-4


def test_flash_attention_takes_packed_batches_in_one_row():
    model = lora_wrapped("llama")
    batch = packed_batch(packed_examples()[1])
    assert causal_loss.varlen_layout(model, batch) is batch  # SDPA masks each row block-diagonally itself
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    assert causal_loss.varlen_layout(model, batch)["input_ids"].shape[0] == 1
    unpacked = random_batch()
    assert causal_loss.varlen_layout(model, unpacked) is unpacked  # padded rows: flash-attention unpads them
