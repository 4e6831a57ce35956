"""Tests for tasks/token_classification.py: bad input named by line or row, prediction and evaluation checked
against `seqeval` with a tagger whose answers are known, `lorafit train --task token-classification` in a
subprocess with its eval, predict and merge, and TOKEN_CLS adapters moving between lorafit and the real
`peft`. The readers and word-piece labels are tested in test_tokens.py, entity scores in test_entities.py."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from test_cli import assert_one_line_error, build_tiny_bert, built_once, minilm_tokenizer, run_cli

from lorafit import LoraConfig, LoraModel, get_lora_model
from lorafit.data import tokens as tagged
from lorafit.tasks.token_classification import evaluate_tagger, format_tagged, tag_texts

seqeval_metrics = pytest.importorskip("seqeval.metrics")

PEOPLE = ["Alice", "Bob", "Carol", "David", "Maria", "Ahmed", "Yuki", "Olga", "Pedro", "Fatima", "Liam", "Chen"]
PLACES = [["Paris"], ["London"], ["New", "York"], ["Berlin"], ["San", "Francisco"], ["Tokyo"], ["Cairo"],
          ["Rio", "de", "Janeiro"], ["Madrid"], ["Lagos"]]
FILLER = "the went to and saw a big city today with friend visited from lives in works near yesterday".split()


def synthetic_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Sentences of filler words, person names (B-PER) and one- to three-word places (B-LOC I-LOC ...)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(4, 10)):
            draw = rng.random()
            if draw < 0.2:
                words.append(rng.choice(PEOPLE))
                tags.append("B-PER")
            elif draw < 0.35:
                place = rng.choice(PLACES)
                words += place
                tags += ["B-LOC"] + ["I-LOC"] * (len(place) - 1)
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        sentences.append((words, tags))
    return sentences


def write_conll(path: Path, sentences, docstart: bool = True) -> Path:
    blocks = ["\n".join(f"{w} {t}" for w, t in zip(words, tags)) for words, tags in sentences]
    path.write_text(("-DOCSTART- -X- -X- O\n\n" if docstart else "") + "\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def _conll(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path



BAD_INPUT = {
    "a line with no tag": ({"train.conll": "EU B-ORG\n\nrejects\n"},
                           ["line 3 of 'train.conll'", "no tag", "last column"]),
    "empty file": ({"train.conll": "\n\n"}, ["'train.conll' holds no tagged tokens", "one token and its tag"]),
    "only a docstart": ({"train.conll": "-DOCSTART- O\n"}, ["holds no tagged tokens"]),
    "mismatched lengths": ({"train.jsonl": json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n"},
                           ["row 1 of 'train.jsonl' has 2 tokens but 1 tags", "one tag per token"]),
    "no rows": ({"train.jsonl": ""}, ["no column 'tokens'", "--tokens-column"]),
    "unknown tag in validation": ({"train.conll": "EU B-ORG\nsays O\n", "dev.conll": "EU B-ORG\n\nPeter B-PER\n"},
                                  ["validation tag 'B-PER' (line 3 of 'dev.conll')", "never occurs in the training"]),
    "one tag only": ({"train.conll": "a O\nb O\n"}, ["only one tag", "at least two"]),
    "tags without a scheme and the f1 metric": ({"train.conll": "runs VB\ndogs NN\n"},
                                                 ["'NN' are not O or B-/I-/E-/S-", "--metric accuracy"]),
    "a tag list that is not a list": ({"train.jsonl": json.dumps({"tokens": ["a"], "tags": 5}) + "\n"},
                                      ["row 1 of 'train.jsonl'", "column 'tags' holds 5"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_naming_the_place_and_the_fix(tmp_path, capsys, case):
    files, fragments = BAD_INPUT[case]
    paths = {name: _conll(tmp_path, name, text) for name, text in files.items()}
    train = next(p for n, p in paths.items() if n.startswith("train"))
    extra = ["--validation-file", paths["dev.conll"]] if "dev.conll" in paths else []
    code, _, err = run_cli(capsys, "train", "--task", "token-classification", "--model", "/nonexistent-model",
                           "--train-file", train, "--output-dir", tmp_path / "run", *extra)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()  # refused before the model is even looked for



# --- prediction and evaluation with a tagger whose answers are known ----------------------------------
class LookupTagger(torch.nn.Module):
    """Logits from the token id alone: chosen word pieces get a tag's logit 2, all others O's."""

    def __init__(self, tokenizer, tags_by_word: dict[str, int], num_tags: int):
        super().__init__()
        self.table = torch.nn.Embedding(tokenizer.vocab_size, num_tags)
        with torch.no_grad():
            self.table.weight.zero_()
            self.table.weight[:, 0] = 2.0
            for word, tag in tags_by_word.items():
                piece = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))[0]
                self.table.weight[piece] = 0.0
                self.table.weight[piece, tag] = 2.0

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(logits=self.table(input_ids))


TAGS = tagged.TagSpace(("O", "B-PER", "I-PER", "B-LOC", "I-LOC"))
P_TOP = math.exp(2) / (math.exp(2) + 4)  # softmax of one logit 2 among five, the rest 0


def lookup_tagger():
    tokenizer = minilm_tokenizer()
    return LookupTagger(tokenizer, {"alice": 1, "new": 3, "york": 4, "smith": 2}, len(TAGS.names)), tokenizer


def test_predict_gives_entities_with_character_spans_and_scores():
    model, tokenizer = lookup_tagger()
    text = "Yesterday  Alice Smith flew to New York."
    (row,) = tag_texts(model, tokenizer, [text], TAGS, max_length=32)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in row["entities"]] == [
        ("PER", "Alice Smith", 11, 22), ("LOC", "New York.", 31, 40)]  # words split at whitespace only
    assert all(math.isclose(e["score"], P_TOP, abs_tol=1e-6) for e in row["entities"])
    assert [w["tag"] for w in row["words"]] == ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"]
    assert format_tagged(row).splitlines() == [text, f"  PER\t{P_TOP:.4f}\tAlice Smith\t[11:22]",
                                               f"  LOC\t{P_TOP:.4f}\tNew York.\t[31:40]"]
    (empty,) = tag_texts(model, tokenizer, ["   "], TAGS, max_length=32)
    assert empty["entities"] == [] and format_tagged(empty).endswith("(no entities)")


def test_evaluation_scores_the_first_piece_of_each_word_as_seqeval_does():
    model, tokenizer = lookup_tagger()
    words = [["Alice", "Smith", "saw", "New", "York"], ["Smith", "went", "to", "Alice"]]
    truth = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["B-PER", "O", "O", "B-LOC"]]
    # what the lookup predicts, word by word (Smith alone is I-PER: seqeval still makes it an entity)
    predicted = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["I-PER", "O", "O", "B-PER"]]
    sentences = tagged.TaggedSentences(words, truth, ["row 1", "row 2"], "x")
    examples = tagged.tokenize_tagged(sentences, tagged.tag_ids(sentences, TAGS, "test"), tokenizer, max_length=32)
    metrics = evaluate_tagger(model, examples, tagged.make_token_collator(tokenizer), 1, TAGS)
    assert metrics["f1"] == round(seqeval_metrics.f1_score(truth, predicted), 6) == 0.75
    assert metrics["precision"] == round(seqeval_metrics.precision_score(truth, predicted), 6)
    assert metrics["accuracy"] == round(seqeval_metrics.accuracy_score(truth, predicted), 6)
    # the loss: mean cross-entropy over the 9 words, -log P_TOP for the 7 right ones, -log((1 - P_TOP) / 4) else
    expected_loss = (7 * -math.log(P_TOP) + 2 * -math.log((1 - P_TOP) / 4)) / 9
    assert math.isclose(metrics["loss"], expected_loss, abs_tol=1e-5)


# --- the command line, end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory) -> Path:
    """`python -m lorafit train --task token-classification` on tiny CoNLL files, with a tiny BERT that ships
    no head (as MiniLM): a finished run folder."""
    model = built_once("tiny_bert_headless", tmp_path_factory, lambda p: build_tiny_bert(p, head=False))
    root = tmp_path_factory.mktemp("tagger")
    train = write_conll(root / "train.conll", synthetic_sentences(32, seed=1))
    dev = write_conll(root / "dev.conll", synthetic_sentences(12, seed=2), docstart=False)
    run = subprocess.run([sys.executable, "-m", "lorafit", "train", "--task", "token-classification",
                          "--model", str(model), "--train-file", str(train), "--validation-file", str(dev),
                          "--output-dir", str(root / "run"), "--max-length", "32", "--batch-size", "8",
                          "--epochs", "2"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 entity tags: O, B-LOC, I-LOC, B-PER" in run.stdout
    assert "train: 32 sentences" in run.stdout and "Tags after training" in run.stdout
    return root


def test_train_writes_a_token_cls_adapter_with_its_head_and_tags(tagger_run):
    best = tagger_run / "run" / "best"
    config = json.loads((best / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["task_type"] == "TOKEN_CLS" and "classifier" in config["modules_to_save"]
    info = json.loads((best / "lorafit.json").read_text(encoding="utf-8"))
    assert info["task"] == "token-classification"
    assert info["id2label"] == {"0": "O", "1": "B-LOC", "2": "I-LOC", "3": "B-PER"}
    records = [json.loads(line) for line in (tagger_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all({"f1", "precision", "recall", "accuracy", "loss"} <= set(r) for r in records)
    card = (tagger_run / "run" / "README.md").read_text(encoding="utf-8")
    assert "AutoModelForTokenClassification" in card and "lorafit predict" in card


def test_eval_reports_entity_scores_of_the_best_epoch(tagger_run, capsys):
    """best/ is the epoch with the best entity F1: eval on the validation file scores what metrics.jsonl says."""
    records = [json.loads(line) for line in (tagger_run / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["f1"])  # the first of equal scores, as the loop keeps it
    code, out, err = run_cli(capsys, "eval", "--adapter", tagger_run / "run" / "best", "--data",
                             tagger_run / "dev.conll", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    for key in ("f1", "precision", "recall", "accuracy"):
        assert metrics[key] == pytest.approx(best[key], abs=1e-6), key
    assert metrics["sentences"] == 12 and set(metrics["per_type"]) <= {"PER", "LOC"}
    code, out, err = run_cli(capsys, "eval", "--adapter", tagger_run / "run" / "best", "--data",
                             tagger_run / "dev.conll")
    assert code == 0, err
    assert "entity precision" in out and "token accuracy" in out and ("\nPER " in out or "\nLOC " in out)


def test_eval_refuses_a_tag_the_adapter_does_not_know(tagger_run, capsys, tmp_path):
    data = _conll(tmp_path, "test.conll", "Paris B-LOC\nSiemens B-ORG\n")
    code, _, err = run_cli(capsys, "eval", "--adapter", tagger_run / "run" / "best", "--data", data)
    assert_one_line_error(code, err, "evaluation tag 'B-ORG' (line 2 of 'test.conll')", "never occurs")


def test_predict_prints_entities_and_writes_json_lines(tagger_run, capsys, tmp_path):
    adapter = tagger_run / "run" / "best"
    texts = ["Alice went to New York", "the big city"]
    code, out, err = run_cli(capsys, "predict", "--adapter", adapter, *texts)
    assert code == 0, err
    output = tmp_path / "tags.jsonl"
    code, _, err = run_cli(capsys, "predict", "--adapter", adapter, *texts, "--output", output)
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts
    expected_lines = []
    for row in rows:
        assert [w["word"] for w in row["words"]] == row["text"].split()
        expected_lines.append(row["text"])
        for e in row["entities"]:
            assert row["text"][e["start"]:e["end"]] == e["text"] and e["type"] in ("PER", "LOC")
            expected_lines.append(f"  {e['type']}\t{e['score']:.4f}\t{e['text']}\t[{e['start']}:{e['end']}]")
        if not row["entities"]:
            expected_lines.append("  (no entities)")
    assert out.splitlines() == expected_lines


def test_a_run_adapter_loads_in_peft_with_the_same_logits(tagger_run):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForTokenClassification

    from lorafit.inference.loading import load_adapter_for_inference

    best = tagger_run / "run" / "best"
    loaded = load_adapter_for_inference(best)
    base_dir = json.loads((best / "lorafit.json").read_text(encoding="utf-8"))["base_model"]
    base = AutoModelForTokenClassification.from_pretrained(base_dir, num_labels=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, str(best)).eval()
    batch = loaded.tokenizer(["Alice went to New York", "the city"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded.model(**batch).logits, theirs(**batch).logits, atol=1e-5)


def test_merge_writes_a_plain_token_classifier_with_the_adapter_logits(tagger_run, capsys, tmp_path):
    from transformers import AutoModelForTokenClassification

    from lorafit.inference.loading import load_adapter_for_inference

    best = tagger_run / "run" / "best"
    code, _, err = run_cli(capsys, "merge", "--adapter", best, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged").eval()
    loaded = load_adapter_for_inference(best)
    batch = loaded.tokenizer(["Alice went to New York", "the city"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, loaded.model(**batch).logits, atol=1e-5)
    assert merged.config.id2label == {0: "O", 1: "B-LOC", 2: "I-LOC", 3: "B-PER"}


def test_hub_dataset_with_class_label_tags(tmp_path, capsys, monkeypatch, tmp_path_factory):
    """A hub NER set (conll2003's shape): ner_tags ids named by a ClassLabel, in its order, not sorted."""
    model = built_once("tiny_bert_headless", tmp_path_factory, lambda p: build_tiny_bert(p, head=False))
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({"id": datasets.Value("string"), "tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})

    def split(n, seed):
        rows = synthetic_sentences(n, seed)
        return datasets.Dataset.from_dict({"id": [str(i) for i in range(n)], "tokens": [w for w, _ in rows],
                                           "ner_tags": [[names.index(t) for t in tags] for _, tags in rows]},
                                          features=features)

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config=None, *a, **k: datasets.DatasetDict({"train": split(16, 1),
                                                                                 "validation": split(8, 2)}))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--task", "token-classification", "--model", model, "--dataset",
                                "conll2003", "--output-dir", out, "--max-length", "32", "--batch-size", "8",
                                "--epochs", "1")
    assert code == 0, err
    info = json.loads((out / "best" / "lorafit.json").read_text(encoding="utf-8"))
    assert info["id2label"] == {str(i): name for i, name in enumerate(names)}
    assert "train: 16 sentences" in stdout and "validation: 8 sentences" in stdout


# --- interop with PEFT on TOKEN_CLS adapters ----------------------------------------------------------
def tiny_bert_tagger(seed: int = 0):
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=5)
    torch.manual_seed(seed)
    return BertForTokenClassification(config).eval()


def _randomise(model, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


TOKEN_CLS = dict(task_type="TOKEN_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])


def _batch():
    from conftest import make_batch

    return make_batch(vocab=100, batch=3, seq=10)


def test_lorafit_token_cls_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ours = get_lora_model(tiny_bert_tagger(), LoraConfig(**TOKEN_CLS))
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    batch = _batch()
    with torch.no_grad():
        expected = ours.eval()(**batch).logits
        assert not torch.allclose(tiny_bert_tagger()(**batch).logits, expected, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_bert_tagger(), str(tmp_path)).eval()
    with torch.no_grad():
        assert (theirs(**batch).logits - expected).abs().max() <= 1e-5


def test_peft_token_cls_adapter_loads_in_lorafit(tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_bert_tagger(), peft.LoraConfig(**TOKEN_CLS))
        _randomise(theirs)
        theirs.save_pretrained(str(tmp_path))
    batch = _batch()
    with torch.no_grad():
        expected = theirs.eval()(**batch).logits
    ours = LoraModel.from_pretrained(tiny_bert_tagger(), tmp_path).eval()
    with torch.no_grad():
        assert (ours(**batch).logits - expected).abs().max() <= 1e-5
        with ours.disable_adapter():
            assert not torch.allclose(ours(**batch).logits, expected, atol=1e-3)


# --- the real base model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_learns_a_synthetic_ner_set(tmp_path):
    """MiniLM ships no token-classification head: one is created, and with LoRA on query/value it learns
    names and places (one- to three-word, B-/I-) to entity F1 above 0.9 on held-out sentences in 2 epochs."""
    train = write_conll(tmp_path / "train.conll", synthetic_sentences(200, seed=1))
    dev = write_conll(tmp_path / "dev.conll", synthetic_sentences(50, seed=2))
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "lorafit", "train", "--task", "token-classification",
                          "--model", "minilm", "--train-file", str(train), "--validation-file", str(dev),
                          "--output-dir", str(tmp_path / "run"), "--epochs", "2"],
                         capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["f1"] > 0.9, records
    assert seconds < 60, f"took {seconds:.0f} s"
