"""Tests for `lorafit generate` on a tiny Llama with a word-level chat tokenizer, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafit.cli import main
from lorafit.config import LoraConfig
from lorafit.inference.generate import stop_token_ids
from lorafit.data.chat import encode_prompt, leading_special_ids, render_messages, text_prefix_ids, tokenize_text
from lorafit.model import LoraModel, get_lora_model
from lorafit.inference.base_models import load_tokenizer
from lorafit.inference.adapter_info import save_adapter_info

SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = ("user assistant system hello world good day how are you the a cat dog sat on mat red blue green "
         "one two three four five six seven eight nine ten sun moon star tree river stone fire water "
         "wind rain snow cloud sky sea hill road house door window book pen cup tea milk bread").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
# a template whose end-of-turn token is named as no other model names it
OWN_END_TEMPLATE = CHAT_TEMPLATE.replace("<|im_end|>", "<turn_done>")
NEW_TOKENS = 6


def build_tokenizer(chat_template: str = CHAT_TEMPLATE):
    """A whitespace word-level tokenizer whose chat template ends turns with <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL + ["<turn_done>"]
    vocab = {token: i for i, token in enumerate(special + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]", chat_template=chat_template)


def build_base(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def save_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    lora = get_lora_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(out)
    save_adapter_info(out, {"task": "causal-lm", "base_model": str(model_dir)})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tokenizer = build_tokenizer()
    model_dir = root / "base"
    build_base(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"root": root, "model_dir": model_dir,
            "a": save_adapter(model_dir, root / "adapter-a", seed=1),
            "b": save_adapter(model_dir, root / "adapter-b", seed=2)}


def reference_model(setup) -> LoraModel:
    """The base with adapters a and b, loaded the plain way, for generating one row at a time."""
    from transformers import AutoModelForCausalLM

    model = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model_dir"]), setup["a"], "a")
    model.load_adapter(setup["b"], "b")
    return model.eval()


def greedy_alone(model: LoraModel, tokenizer, ids: list[int], adapter: str) -> str:
    """Greedy reply to one prompt with set_adapter (or with the adapters off), cut at the stop tokens."""
    stops = stop_token_ids(model.model, tokenizer)
    kwargs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                  max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops, pad_token_id=0)
    with torch.inference_mode():
        if adapter == "__base__":
            with model.disable_adapter():
                output = model.generate(**kwargs)[0, len(ids):].tolist()
        else:
            model.set_adapter(adapter)
            output = model.generate(**kwargs)[0, len(ids):].tolist()
    ends = [i for i, token in enumerate(output) if token in stops]
    return tokenizer.decode(output[:ends[0]] if ends else output, skip_special_tokens=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_stop_tokens_include_chat_end_of_turn(setup):
    tokenizer = load_tokenizer(str(setup["model_dir"]))
    model = reference_model(setup)
    assert set(stop_token_ids(model.model, tokenizer)) == {2, tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_stop_tokens_are_the_templates_own_end_of_turn():
    # training teaches a reply to end with whatever token the template closes a turn with
    tokenizer = build_tokenizer(OWN_END_TEMPLATE)
    ids = stop_token_ids(build_base(len(tokenizer)), tokenizer)
    assert set(ids) == {2, tokenizer.convert_tokens_to_ids("<turn_done>")}


def test_stop_tokens_without_a_chat_template_are_the_eos():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    assert stop_token_ids(build_base(len(tokenizer)), tokenizer) == [2]


@pytest.mark.slow
def test_smollm2_stops_at_its_end_of_turn_only():
    from transformers import AutoModelForCausalLM

    from lorafit.inference.base_models import resolve_model

    path = resolve_model("smollm2")
    tokenizer = load_tokenizer(path)
    assert stop_token_ids(AutoModelForCausalLM.from_pretrained(path), tokenizer) == [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_streaming_matches_greedy_reference(setup, capsys):
    prompts = ["hello world", "how are you the cat"]
    assert main(["generate", "--adapter", str(setup["a"]), *prompts, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    tokenizer = load_tokenizer(str(setup["model_dir"]))
    model = reference_model(setup)
    expected = [greedy_alone(model, tokenizer, encode_prompt(tokenizer, p), "a") for p in prompts]
    assert all(expected)
    assert capsys.readouterr().out == "\n\n".join(expected) + "\n"


def test_mixed_adapter_batch_equals_rows_alone(setup, tmp_path):
    rows = [{"prompt": "hello world", "adapter": "a"},
            {"prompt": "the cat sat on the mat and the dog sat on a red book", "adapter": "b"},
            {"prompt": "good day", "adapter": "__base__"},
            {"prompt": "one two three", "adapter": None},
            {"prompt": "sun moon star", "adapter": "b"}]
    out = tmp_path / "out.jsonl"
    code = main(["generate", "--adapter", f"a={setup['a']}", "--adapter", f"b={setup['b']}",
                 "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out),
                 "--batch-size", "4", "--max-new-tokens", str(NEW_TOKENS), "--system", "two"])
    assert code == 0
    tokenizer = load_tokenizer(str(setup["model_dir"]))
    model = reference_model(setup)
    expected = [{"prompt": row["prompt"], "adapter": row["adapter"] or "a",
                 "response": greedy_alone(model, tokenizer, encode_prompt(tokenizer, row["prompt"], "two"),
                                          row["adapter"] or "a")} for row in rows]
    assert read_jsonl(out) == expected
    by_adapter = {name: greedy_alone(model, tokenizer, encode_prompt(tokenizer, "hello world", "two"), name)
                  for name in ("a", "b", "__base__")}
    assert len(set(by_adapter.values())) == 3, "the adapters should change what is generated"


def test_messages_input_drops_trailing_assistant_turn(setup, tmp_path):
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good day"},
                    {"role": "user", "content": "how are you"}]
    rows = [{"messages": conversation + [{"role": "assistant", "content": "one two"}]}]
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--adapter", str(setup["b"]), "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)),
                 "--output", str(out), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    tokenizer = load_tokenizer(str(setup["model_dir"]))
    text = render_messages(tokenizer, conversation, add_generation_prompt=True)
    ids = text_prefix_ids(tokenizer) + tokenize_text(tokenizer, text)
    model = reference_model(setup)
    assert read_jsonl(out) == [{"prompt": "how are you", "messages": conversation,
                                "response": greedy_alone(model, tokenizer, ids, "b")}]


def test_no_chat_template_feeds_raw_prompt(setup, tmp_path, capsys):
    assert main(["generate", "--adapter", str(setup["a"]), "--no-chat-template", "the cat sat",
                 "--max-new-tokens", str(NEW_TOKENS)]) == 0
    tokenizer = load_tokenizer(str(setup["model_dir"]))
    ids = leading_special_ids(tokenizer) + tokenize_text(tokenizer, "the cat sat")
    assert capsys.readouterr().out == greedy_alone(reference_model(setup), tokenizer, ids, "a") + "\n"


def test_sampling_with_seed_is_reproducible(setup, tmp_path):
    prompts = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello world"}, {"prompt": "the red cat"}])
    outputs = []
    for name in ("one.jsonl", "two.jsonl"):
        out = tmp_path / name
        assert main(["generate", "--adapter", str(setup["a"]), "--input", str(prompts), "--output", str(out),
                     "--temperature", "1.5", "--top-p", "0.95", "--top-k", "20", "--seed", "7",
                     "--max-new-tokens", "12"]) == 0
        outputs.append(read_jsonl(out))
    assert outputs[0] == outputs[1]
    assert all("adapter" not in row for row in outputs[0])


def _classification_adapter(setup, tmp_path) -> Path:
    import shutil

    path = tmp_path / "classifier"
    shutil.copytree(setup["a"], path)
    save_adapter_info(path, {"task": "classification", "base_model": str(setup["model_dir"])})
    return path


def _other_base_adapter(setup, tmp_path) -> Path:
    import shutil

    path = tmp_path / "other"
    shutil.copytree(setup["b"], path)
    save_adapter_info(path, {"task": "causal-lm", "base_model": str(tmp_path)})
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing-adapter", "does not exist"),
    ("classification", "lorafit predict"),
    ("unknown-row-adapter", "loaded: a, b"),
    ("empty-prompt", "prompt argument 2 has an empty prompt"),
    ("no-prompts", "nothing to generate"),
    ("no-prompt-column", "--prompt-column NAME"),
    ("different-bases", "different base models"),
    ("duplicate-names", "its own name"),
    ("bad-temperature", "--temperature"),
    ("output-is-dir", "is a directory"),
    ("output-under-file", "is a file"),
    ("temperature-inf", "--temperature must be a number >= 0 (not inf or nan), got inf"),
    ("top-p-nan", "--top-p must be in (0, 1], got nan"),
    ("seed-huge", "--seed must be an integer from 0 to 4294967295"),
    ("seed-negative", "--seed must be an integer from 0 to 4294967295, got -1"),
    # past the model's context GPT-2 fails with an IndexError and others run on and on
    ("output-is-input", "would replace the prompts"),
    ("past-context", "exceeds the model's context of 128 tokens; pass --max-new-tokens"),
    ("message-content-null", "row 1 of"),  # the row is named in the message below
    ("message-content-null", "'messages' must be a list of {\"role\": str, \"content\": str} objects"),
])
def test_bad_input_is_one_line_error(setup, tmp_path, capsys, case, expected):
    a, b = str(setup["a"]), str(setup["b"])
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello", "adapter": "a"}, {"prompt": "hi", "adapter": "c"}])
    argv = {
        "missing-adapter": ["--adapter", str(tmp_path / "nope"), "hello"],
        "classification": ["--adapter", str(_classification_adapter(setup, tmp_path)), "hello"],
        "unknown-row-adapter": ["--adapter", f"a={a}", "--adapter", f"b={b}", "--input", str(rows),
                                "--output", str(tmp_path / "out.jsonl")],
        "empty-prompt": ["--adapter", a, "hello", "  "],
        "no-prompts": ["--adapter", a],
        "no-prompt-column": ["--adapter", a, "--input", str(rows), "--prompt-column", "text"],
        "different-bases": ["--adapter", f"a={a}", "--adapter", f"o={_other_base_adapter(setup, tmp_path)}", "hi"],
        "duplicate-names": ["--adapter", a, "--adapter", b, "hello"],
        "bad-temperature": ["--adapter", a, "--temperature", "-1", "hello"],
        "output-is-dir": ["--adapter", a, "hello", "--output", str(tmp_path)],
        "output-under-file": ["--adapter", a, "hello", "--output", str(rows / "out.jsonl")],
        "temperature-inf": ["--adapter", a, "--temperature", "inf", "hello"],
        "top-p-nan": ["--adapter", a, "--temperature", "1", "--top-p", "nan", "hello"],
        "seed-huge": ["--adapter", a, "--temperature", "1", "--seed", "1" * 23, "hello"],
        "seed-negative": ["--adapter", a, "--temperature", "1", "--seed", "-1", "hello"],
        "output-is-input": ["--adapter", a, "--input", str(rows), "--output", str(rows)],
        "past-context": ["--adapter", a, "--max-new-tokens", "10000000000", "hello"],
        "message-content-null": ["--adapter", a, "--max-new-tokens", "8", "--input", str(write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": None}]}]))],
    }[case]
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorafit generate: error:"), err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()
    assert [r["prompt"] for r in read_jsonl(rows)] == ["hello", "hi"]


def test_train_held_out_replies_equal_generate_replies(tmp_path, capsys):
    """The replies `lorafit train` scores and shows are the ones `lorafit generate` gives for its adapter."""
    from lorafit.tasks.pipeline import run_train
    from lorafit.training.settings import TrainConfig

    tokenizer = build_tokenizer(OWN_END_TEMPLATE)
    model_dir = tmp_path / "base"
    build_base(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    numbers = WORDS[WORDS.index("one"):WORDS.index("ten") + 1]
    # one reply for every prompt: a tiny model learns it in a few steps, and its end-of-turn token after it
    records = [{"prompt": f"{a} {b}", "response": "sun moon star tree"} for a, b in zip(numbers, numbers[::-1])]
    train = write_jsonl(tmp_path / "train.jsonl", records * 3)
    validation = write_jsonl(tmp_path / "validation.jsonl", records[:3])
    config = TrainConfig(task="causal-lm", model=str(model_dir), train_file=str(train),
                         validation_file=str(validation), max_length=32, lr=3e-2, batch_size=6, max_steps=20,
                         lora_dropout=0.0, target_modules=["all-linear"], output_dir=str(tmp_path / "out"))
    run_train(config)
    printed = capsys.readouterr().out.split("Sample generations after training")[1]
    trained = [line.removeprefix("generated: ") for line in printed.splitlines() if line.startswith("generated: ")]
    assert len(trained) == 3 and any(trained)
    budget = max(len(r["response"].split()) for r in records[:3]) + 8  # train's held-out reply budget
    assert main(["generate", "--adapter", str(tmp_path / "out" / "best"), "--max-new-tokens", str(budget),
                 *[r["prompt"] for r in records[:3]]]) == 0
    assert capsys.readouterr().out == "\n\n".join(trained) + "\n"
