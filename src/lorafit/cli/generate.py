"""Generate text with one or more causal-LM adapters.

  lorafit generate --adapter runs/x/best "Write a haiku about autumn"
  lorafit generate --adapter runs/x/best --input prompts.jsonl --output responses.jsonl
  lorafit generate --adapter poet=runs/a/best --adapter coder=runs/b/best --input rows.jsonl --output out.jsonl

Prompts given as arguments stream to the terminal as they are generated. --input reads a
`prompt` column (or chat `messages`, minus a trailing assistant turn) and writes JSON Lines
{"prompt", "response", "adapter"} to --output (or stdout). A row's `adapter` column names one of
the loaded adapters ("__base__": the base model alone; empty: the first --adapter), and each batch
runs once with every row on its own adapter. Decoding is greedy unless --temperature is above 0.
Prompts get the chat template (or lorafit's plain template) as in training, unless
--no-chat-template."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.data import classification as data
from lorafit.errors import LorafitError
from lorafit.layers import BASE_ADAPTER
from lorafit.data.chat import encode_prompt, leading_special_ids, render_messages, text_prefix_ids, tokenize_text
from lorafit.inference.loading import LoadedAdapter, adapter_task, check_adapter_dir, load_adapter_for_inference
from lorafit.model import DEFAULT_ADAPTER, LoraModel
from lorafit.output_paths import check_output_file
from lorafit.training.run_dir import load_adapter_info
from lorafit.serialization import atomic_path, read_adapter_config
from lorafit.training.settings import check_number, check_positive_int, check_seed

NAME = "generate"
HELP = "generate text with causal-LM adapters"

# chat models end a turn with a token of their own that the generation config may not list
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class Request:
    prompt: str
    adapter: str
    messages: list[dict] | None = None
    input_ids: list[int] | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts to answer, streamed one after another (or use --input)")
    parser.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                        help="adapter directory (a run's best/ folder); repeat as NAME=DIR to load several")
    parser.add_argument("--model", help="base model, if not the one the adapters were trained on")
    parser.add_argument("--input", help="file of prompts: CSV, TSV, JSON Lines, JSON, Parquet")
    parser.add_argument("--prompt-column", default="prompt",
                        help="column of --input holding the prompts (default: prompt)")
    parser.add_argument("--encoding", help="encoding of --input when not UTF-8")
    parser.add_argument("--output", help="write JSON Lines here instead of streaming to the terminal")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="most tokens generated per prompt (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="above 0 samples instead of decoding greedily (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the likeliest tokens holding this probability (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k likeliest tokens, 0 for all (default: 50)")
    parser.add_argument("--seed", type=int, help="random seed (0 to 4294967295), for reproducible sampling")
    parser.add_argument("--system", help="system prompt put before every prompt")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="feed prompts as raw text, without the chat or instruction template")


def parse_adapter_specs(values: list[str]) -> dict[str, Path]:
    """NAME=DIR or DIR (named "default") per --adapter, in the order given."""
    specs: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or Path(value).is_dir():
            name, directory = DEFAULT_ADAPTER, value
        if not name or not directory:
            raise LorafitError(f"--adapter '{value}' is incomplete; pass DIR or NAME=DIR")
        if name == BASE_ADAPTER:
            raise LorafitError(f"adapter name {BASE_ADAPTER!r} is reserved for the base model; pick another NAME")
        if name in specs:
            raise LorafitError(f"two adapters are named {name!r}; give each --adapter its own name: NAME=DIR")
        specs[name] = check_adapter_dir(directory)
    return specs


def check_adapters(specs: dict[str, Path], model: str | None) -> None:
    """Refuse classification adapters and adapters trained on different bases, before loading anything."""
    bases: dict[str, str] = {}
    for name, directory in specs.items():
        info = load_adapter_info(directory)
        task = adapter_task(directory, info)
        if task != "causal-lm":
            raise LorafitError(f"'{directory}' is a {task} adapter; use `lorafit predict` for it")
        base = info.get("base_model") or read_adapter_config(directory).base_model_name_or_path
        if base:
            bases[name] = _same_base_key(base)
    if model is None and len(set(bases.values())) > 1:
        listing = ", ".join(f"{name}: {base}" for name, base in bases.items())
        raise LorafitError(f"the adapters were trained on different base models ({listing}); "
                           "load only adapters of one base model, or pass --model to use one for all")


def _same_base_key(base: str) -> str:
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else base


def load_adapters(specs: dict[str, Path], model: str | None) -> LoadedAdapter:
    """The base model with every adapter loaded under its name, ready for left-padded batches."""
    check_adapters(specs, model)
    loaded = load_adapter_for_inference(next(iter(specs.values())), model, padding_side="left")
    if list(specs) != [DEFAULT_ADAPTER]:
        # load_adapter_for_inference names its one adapter "default": start again with the names given
        loaded.model = LoraModel(loaded.model.unload())
        for name, directory in specs.items():
            loaded.model.load_adapter(directory, name)
    loaded.model.eval()
    return loaded


def stop_token_ids(model, tokenizer) -> list[int]:
    """Ids that end a reply: the generation config's eos ids, the tokenizer's eos, a chat end-of-turn token."""
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    ids += [tokenizer.convert_tokens_to_ids(token) for token in _END_OF_TURN_TOKENS if token in special]
    return list(dict.fromkeys(i for i in ids if i is not None))


def build_generation_config(args: argparse.Namespace, model, tokenizer):
    """The model's generation config with lorafit's decoding settings on top."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = args.max_new_tokens
    config.eos_token_id = stop_token_ids(model, tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.num_beams = 1
    config.do_sample = args.temperature > 0
    if config.do_sample:
        config.temperature, config.top_p, config.top_k = args.temperature, args.top_p, args.top_k
    else:
        config.temperature = config.top_p = config.top_k = None
    return config


def check_settings(args: argparse.Namespace) -> None:
    """Refuse numbers generation cannot use, naming the flag."""
    check_positive_int("batch_size", args.batch_size)
    check_positive_int("max_new_tokens", args.max_new_tokens)
    check_number("temperature", args.temperature, ">= 0")
    check_number("top_p", args.top_p, "in (0, 1]")
    if args.top_k < 0:
        raise LorafitError(f"--top-k must be 0 (off) or a positive integer, got {args.top_k}")
    if args.seed is not None:
        check_seed("seed", args.seed)
    if args.prompts and args.input:
        raise LorafitError("pass prompts as arguments or --input FILE, not both")
    if not args.prompts and not args.input:
        raise LorafitError("nothing to generate: pass prompts as arguments or --input FILE")
    if args.output:
        check_output_file(args.output, "--output", "responses.jsonl", args.input, "prompts")


def check_context(model_config, requests: list[Request], max_new_tokens: int) -> None:
    """Refuse a prompt plus --max-new-tokens longer than the positions the model has."""
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not context:
        return
    longest = max(len(r.input_ids) for r in requests)
    if longest >= context:
        raise LorafitError(f"a prompt of {longest} tokens fills the model's context of {context} tokens; shorten it")
    if longest + max_new_tokens > context:
        raise LorafitError(f"--max-new-tokens {max_new_tokens} plus the longest prompt ({longest} tokens) exceeds "
                           f"the model's context of {context} tokens; pass --max-new-tokens {context - longest} or less")


def read_requests(args: argparse.Namespace, adapters: list[str]) -> list[Request]:
    """The prompts from the arguments or --input, checked, each with the adapter it runs on."""
    if args.prompts:
        rows = [{args.prompt_column: prompt} for prompt in args.prompts]
        return [_request(row, f"prompt argument {i + 1}", adapters, args) for i, row in enumerate(rows)]
    table = data.read_table(args.input, encoding=args.encoding, role="input file")
    if args.prompt_column not in table.column_names and "messages" not in table.column_names:
        raise LorafitError(f"input file '{args.input}' has no '{args.prompt_column}' column (found: "
                           f"{', '.join(table.column_names)}); pass --prompt-column NAME or give chat 'messages'")
    if len(table) == 0:
        raise LorafitError(f"nothing to generate: input file '{args.input}' has no rows")
    return [_request(row, f"row {i + 1} of '{args.input}'", adapters, args) for i, row in enumerate(table.to_list())]


def _request(row: dict, where: str, adapters: list[str], args: argparse.Namespace) -> Request:
    adapter = _row_adapter(row.get("adapter"), where, adapters)
    prompt = row.get(args.prompt_column)
    if prompt is None and row.get("messages") is not None:
        if not args.chat_template:
            raise LorafitError("--no-chat-template feeds raw prompts, but the input has chat 'messages'; "
                               "drop --no-chat-template or give a prompt column")
        messages = conversation_of(row["messages"], where)
        user = [m["content"] for m in messages if m["role"] == "user"]
        return Request(user[-1] if user else "", adapter, messages)
    if prompt is None or not str(prompt).strip():
        raise LorafitError(f"{where} has an empty prompt; fill it in or remove it")
    return Request(str(prompt), adapter)


def _row_adapter(value, where: str, adapters: list[str]) -> str:
    if value is None or str(value).strip() == "":
        return adapters[0]
    name = str(value).strip()
    if name != BASE_ADAPTER and name not in adapters:
        raise LorafitError(f"{where} asks for adapter {name!r}, which is not loaded; loaded: "
                           f"{', '.join(adapters)} (or {BASE_ADAPTER!r} for the base model)")
    return name


def conversation_of(value, where: str) -> list[dict]:
    """A row's messages without a trailing assistant turn, checked to be role/content pairs."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in value):
        raise LorafitError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not any(str(m["content"] or "").strip() for m in messages):
        raise LorafitError(f"{where}: the conversation is empty; give it at least one user message")
    return messages


def encode_request(tokenizer, request: Request, args: argparse.Namespace) -> list[int]:
    """Token ids of a prompt or conversation, ending where the assistant's reply starts.

    Built as training builds prompts (same template, same prefix ids), or from the raw text
    with --no-chat-template.
    """
    if request.messages is not None:
        messages = request.messages
        if args.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": args.system}, *messages]
        text = render_messages(tokenizer, messages, add_generation_prompt=True)
        return text_prefix_ids(tokenizer) + tokenize_text(tokenizer, text)
    if args.chat_template:
        return encode_prompt(tokenizer, request.prompt, args.system)
    return leading_special_ids(tokenizer) + tokenize_text(tokenizer, request.prompt)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with the padding on the left, so every row ends where generation starts."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in sequences])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in sequences])
    return input_ids, attention_mask


def new_tokens(sequence: torch.Tensor, prompt_width: int, stop_ids: list[int]) -> list[int]:
    """The generated ids of one row, cut before its first stop token."""
    generated = sequence[prompt_width:].tolist()
    ends = [i for i, token in enumerate(generated) if token in stop_ids]
    return generated[:ends[0]] if ends else generated


@torch.inference_mode()
def generate_batch(loaded: LoadedAdapter, requests: list[Request], config, streamer=None) -> list[str]:
    """Responses to ``requests``, run as one batch with each row on its own adapter."""
    input_ids, attention_mask = left_pad([r.input_ids for r in requests], loaded.tokenizer.pad_token_id)
    device = loaded.model.device
    output = loaded.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   adapter_names=[r.adapter for r in requests], generation_config=config,
                                   streamer=streamer)
    return [loaded.tokenizer.decode(new_tokens(row, input_ids.shape[1], config.eos_token_id),
                                    skip_special_tokens=True) for row in output]


def stream_responses(loaded: LoadedAdapter, requests: list[Request], config) -> None:
    """Print each response token by token as it is generated, a blank line between responses."""
    from transformers import TextStreamer

    for i, request in enumerate(requests):
        if i:
            print()
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_batch(loaded, [request], config, streamer=streamer)


def response_rows(loaded: LoadedAdapter, requests: list[Request], config, batch_size: int,
                  show_adapter: bool) -> list[dict]:
    """One output row per request, generated ``batch_size`` at a time."""
    rows = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        for request, response in zip(batch, generate_batch(loaded, batch, config)):
            row = {"prompt": request.prompt, "response": response}
            if request.messages is not None:
                row["messages"] = request.messages
            if show_adapter:
                row["adapter"] = request.adapter
            rows.append(row)
        if sys.stderr.isatty():
            print(f"\rgenerated {len(rows)}/{len(requests)}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return rows


def write_rows(rows: list[dict], output: str | None) -> None:
    """JSON Lines to ``output`` (replaced only once complete), or to stdout."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output is None:
        sys.stdout.write(text)
        return
    with atomic_path(output) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {len(rows)} responses to {output}")


def run(args: argparse.Namespace) -> int:
    check_settings(args)
    specs = parse_adapter_specs(args.adapter)
    requests = read_requests(args, list(specs))  # bad input fails before the slow model load
    loaded = load_adapters(specs, args.model)
    for request in requests:
        request.input_ids = encode_request(loaded.tokenizer, request, args)
    check_context(loaded.model.get_base_model().config, requests, args.max_new_tokens)
    config = build_generation_config(args, loaded.model.get_base_model(), loaded.tokenizer)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    if args.input is None and args.output is None:
        stream_responses(loaded, requests, config)
        return 0
    show_adapter = len(specs) > 1 or any(r.adapter != next(iter(specs)) for r in requests)
    write_rows(response_rows(loaded, requests, config, args.batch_size, show_adapter), args.output)
    return 0
