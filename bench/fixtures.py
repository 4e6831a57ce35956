"""What each case runs on: the real models and data (full suite) or tiny ones built on the spot (smoke).

The smoke fixtures need no download and no cached conversion: a word-level tokenizer is built from
the texts themselves, and BERT / Llama models come from small configs with random weights.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import BENCH

REVIEWS_TRAIN = BENCH / "data" / "reviews_train.jsonl"
REVIEWS_VALIDATION = BENCH / "data" / "reviews_validation.jsonl"


@dataclass
class Sizes:
    """Every knob of the suite; ``full()`` is the issue's setting, ``smoke()`` a seconds-long one."""

    batch_size: int = 16
    max_length: int = 64
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lr: float = 1e-3
    seed: int = 42
    infer_batch: int = 64
    infer_tokens: int = 64
    infer_rounds: int = 60
    mixed_rounds: int = 20
    switch_repeats: int = 200
    reload_repeats: int = 5
    llm_max_length: int = 256
    llm_batch_size: int = 4
    llm_examples: int = 400  # the reference setting; 100 steps also steady the figure
    llm_lr: float = 2e-4
    scaling_ranks: tuple = (1, 4, 16, 64)
    scaling_lengths: tuple = (32, 64, 128, 256)
    scaling_steps: int = 5
    matmul_n: int = 2048
    shared_steps: int = 20  # timed training steps per background load in the `shared` case
    serve_llm_adapters: int = 8
    serve_cls_adapters: int = 4
    serve_llm_requests: int = 200
    # one request at a time is slow by design: its rate is steady after the first few, so a prefix of the same
    # requests measures it and keeps the case near 15 minutes on two busy cores
    serve_baseline_llm_requests: int = 64
    serve_llm_clients: int = 16
    serve_max_tokens: int = 32
    serve_cls_requests: int = 512
    serve_cls_clients: int = 64
    serve_max_batch: int = 64
    serve_reference_prompts: int = 60  # the built-in instruct task's held-out prompts, all of them

    @classmethod
    def full(cls) -> "Sizes":
        return cls()

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(infer_batch=8, infer_tokens=16, infer_rounds=3, mixed_rounds=2, switch_repeats=20,
                   reload_repeats=2, llm_max_length=64, llm_examples=16, scaling_lengths=(8, 16, 32, 64),
                   scaling_steps=2, matmul_n=256, shared_steps=3, serve_llm_adapters=2, serve_cls_adapters=2,
                   serve_llm_requests=12, serve_baseline_llm_requests=12, serve_llm_clients=4, serve_max_tokens=6,
                   serve_cls_requests=24, serve_cls_clients=8, serve_max_batch=8, serve_reference_prompts=4)


@dataclass
class Setup:
    """Paths every measurement reads, plus the sizes; travels to worker processes as JSON."""

    smoke: bool
    workdir: str
    cls_model: str
    train_file: str
    validation_file: str
    llm_model: str
    llm_train_file: str
    sizes: Sizes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Setup":
        sizes = dict(data["sizes"])
        sizes["scaling_ranks"], sizes["scaling_lengths"] = tuple(sizes["scaling_ranks"]), tuple(sizes["scaling_lengths"])
        return cls(**{**data, "sizes": Sizes(**sizes)})


def instruct_records(count: int) -> list[dict]:
    """lorafit's built-in instruction set, repeated (in order) until there are ``count`` records."""
    import lorafit

    path = Path(lorafit.__file__).parent / "builtin_data" / "instruct" / "train.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [records[i % len(records)] for i in range(count)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(smoke: bool, workdir: Path, sizes: Sizes | None = None, cpu_models: bool = True) -> Setup:
    """Resolve (full) or build (smoke) the models and data files into ``workdir``.

    ``cpu_models=False`` (a GPU-only run, whose models come from configs) resolves nothing, so the
    GPU suite runs on a machine without the CPU suite's model packages and conversion cache.
    """
    sizes = sizes or (Sizes.smoke() if smoke else Sizes.full())
    workdir.mkdir(parents=True, exist_ok=True)
    if not cpu_models:
        return Setup(smoke, str(workdir), "", "", "", "", "", sizes)
    llm_train = write_jsonl(workdir / "instruct_train.jsonl", instruct_records(sizes.llm_examples))
    if smoke:
        train, validation = smoke_reviews(64, seed=1), smoke_reviews(32, seed=2)
        train_file = write_jsonl(workdir / "reviews_train.jsonl", train)
        validation_file = write_jsonl(workdir / "reviews_validation.jsonl", validation)
        texts = [r["text"] for r in train + validation] + [r["prompt"] + " " + r["response"]
                                                           for r in instruct_records(sizes.llm_examples)]
        cls_model, llm_model = tiny_bert_dir(workdir / "tiny-bert", texts), tiny_llama_dir(workdir / "tiny-llama", texts)
    else:
        from lorafit.inference.base_models import resolve_model

        for path in (REVIEWS_TRAIN, REVIEWS_VALIDATION):
            if not path.is_file():
                raise SystemExit(f"{path} is missing: create it with `python bench/make_reviews.py`")
        train_file, validation_file = REVIEWS_TRAIN, REVIEWS_VALIDATION
        cls_model, llm_model = resolve_model("minilm"), resolve_model("smollm2")
    return Setup(smoke, str(workdir), str(cls_model), str(train_file), str(validation_file), str(llm_model),
                 str(llm_train), sizes)


# --- smoke fixtures ------------------------------------------------------------------------------
_GOOD = ["great", "wonderful", "loved", "excellent", "superb", "fun", "moving", "brilliant"]
_BAD = ["awful", "boring", "hated", "dull", "terrible", "weak", "messy", "poor"]
_FILLER = ["the", "film", "plot", "acting", "was", "and", "a", "with", "story", "cast", "it", "is", "of", "scene"]


def smoke_reviews(count: int, seed: int) -> list[dict]:
    """Short synthetic reviews of varied length whose label follows their sentiment words."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        positive = i % 2 == 0
        words = [rng.choice(_FILLER) for _ in range(rng.randint(2, 40))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_GOOD if positive else _BAD))
        records.append({"text": " ".join(words) + " .", "label": "positive" if positive else "negative"})
    return records


def _word_level(texts: list[str], specials: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t.lower())})
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer, len(vocab)


def tiny_bert_dir(path: Path, texts: list[str]) -> Path:
    """A 2-layer BERT classifier base with a word-level tokenizer, saved like a hub model."""
    import torch
    from tokenizers import processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if (path / "config.json").is_file():
        return path
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    core, vocab_size = _word_level(texts, specials)
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llama_dir(path: Path, texts: list[str]) -> Path:
    """A 2-layer Llama with a chat template like SmolLM2's, saved like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (path / "config.json").is_file():
        return path
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    core, vocab_size = _word_level(texts, specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>", model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
