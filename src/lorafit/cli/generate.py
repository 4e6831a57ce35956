"""Generate text with one or more causal-LM adapters, or seq2seq (T5, BART) adapters.

  lorafit generate --adapter runs/x/best "Write a haiku about autumn"
  lorafit generate --adapter runs/x/best --input prompts.jsonl --output responses.jsonl
  lorafit generate --adapter poet=runs/a/best --adapter coder=runs/b/best --input rows.jsonl --output out.jsonl

Prompts given as arguments stream to the terminal as they are generated. --input reads a
`prompt` column (or chat `messages`, minus a trailing assistant turn) and writes JSON Lines
{"prompt", "response", "adapter"} to --output (or stdout). A row's `adapter` column names one of
the loaded adapters ("__base__": the base model alone; empty: the first --adapter), and each batch
runs once with every row on its own adapter. Decoding is greedy unless --temperature is above 0.
Prompts get the chat template (or lorafit's plain template) as in training, unless
--no-chat-template; a seq2seq adapter's encoder reads each prompt as plain text, as in training."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lorafit.cli import add_dataclass_flags, settings_from_args
from lorafit.data.readers import read_table
from lorafit.errors import LorafitError
from lorafit.inference.generate import GenerationSettings, check_context, encode_prompt, generate_from_ids
from lorafit.inference.loading import LoadedAdapter, check_adapter_dir, load_adapters
from lorafit.training.settings import QuantizeSettings
from lorafit.layers import BASE_ADAPTER
from lorafit.model import DEFAULT_ADAPTER
from lorafit.files import check_output_file, write_text

NAME = "generate"
HELP = "generate text with causal-LM or seq2seq adapters"


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
    add_dataclass_flags(parser, GenerationSettings)
    add_dataclass_flags(parser, QuantizeSettings)


def parse_adapter_specs(values: list[str], *, names_required: bool = False) -> dict[str, Path]:
    """NAME=DIR per --adapter (or, unless ``names_required``, DIR alone, named "default"), in the order given,
    each folder checked before any model is loaded."""
    specs: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name = name.strip()
        if names_required and (not sep or not name or not directory):
            raise LorafitError(f"--adapter '{value}' needs a name: pass NAME=DIR (clients ask for NAME as `model`)")
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


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse a missing or doubled source of prompts, and an --output that cannot be written."""
    if args.prompts and args.input:
        raise LorafitError("pass prompts as arguments or --input FILE, not both")
    if not args.prompts and not args.input:
        raise LorafitError("nothing to generate: pass prompts as arguments or --input FILE")
    if args.output:
        check_output_file(args.output, "--output", "responses.jsonl", args.input, "prompts")


def read_requests(args: argparse.Namespace, adapters: list[str], chat_template: bool) -> list[Request]:
    """The prompts from the arguments or --input, checked, each with the adapter it runs on."""
    if args.prompts:
        rows = [{args.prompt_column: prompt} for prompt in args.prompts]
        return [_request(row, f"prompt argument {i + 1}", adapters, args.prompt_column, chat_template)
                for i, row in enumerate(rows)]
    table = read_table(args.input, encoding=args.encoding, role="input file")
    if args.prompt_column not in table.column_names and "messages" not in table.column_names:
        raise LorafitError(f"input file '{args.input}' has no '{args.prompt_column}' column (found: "
                           f"{', '.join(table.column_names)}); pass --prompt-column NAME or give chat 'messages'")
    if len(table) == 0:
        raise LorafitError(f"nothing to generate: input file '{args.input}' has no rows")
    return [_request(row, f"row {i + 1} of '{args.input}'", adapters, args.prompt_column, chat_template)
            for i, row in enumerate(table.to_list())]


def _request(row: dict, where: str, adapters: list[str], prompt_column: str, chat_template: bool) -> Request:
    adapter = _row_adapter(row.get("adapter"), where, adapters)
    prompt = row.get(prompt_column)
    if prompt is None and row.get("messages") is not None:
        if not chat_template:
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
    """A row's messages without a trailing assistant turn, checked to be role/content pairs of text."""
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise LorafitError(f"{where}: 'messages' must be a list of {{\"role\": str, \"content\": str}} objects; "
                           "fix that row")
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not any(m["content"].strip() for m in messages):
        raise LorafitError(f"{where}: the conversation is empty; give it at least one user message")
    return messages


def stream_responses(loaded: LoadedAdapter, requests: list[Request], settings: GenerationSettings) -> None:
    """Print each response token by token as it is generated, a blank line between responses."""
    from transformers import TextStreamer

    for i, request in enumerate(requests):
        if i:
            print()
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_from_ids(loaded.model, loaded.tokenizer, [request.input_ids], settings, [request.adapter], streamer)


def response_rows(loaded: LoadedAdapter, requests: list[Request], settings: GenerationSettings,
                  show_adapter: bool) -> list[dict]:
    """One output row per request, in their order (progress shown on a terminal)."""
    def show_progress(done: int) -> None:
        if sys.stderr.isatty():
            print(f"\rgenerated {done}/{len(requests)}", end="", file=sys.stderr, flush=True)

    responses = generate_from_ids(loaded.model, loaded.tokenizer, [r.input_ids for r in requests], settings,
                                  [r.adapter for r in requests], progress=show_progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    rows = []
    for request, response in zip(requests, responses):
        row = {"prompt": request.prompt, "response": response}
        if request.messages is not None:
            row["messages"] = request.messages
        if show_adapter:
            row["adapter"] = request.adapter
        rows.append(row)
    return rows


def write_rows(rows: list[dict], output: str | None) -> None:
    """JSON Lines to ``output`` (replaced only once complete), or to stdout."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output is None:
        sys.stdout.write(text)
        return
    write_text(output, text)
    print(f"wrote {len(rows)} responses to {output}")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, GenerationSettings)
    check_inputs(args)
    specs = parse_adapter_specs(args.adapter)
    requests = read_requests(args, list(specs), settings.chat_template)  # bad input fails before the slow load
    loaded = load_adapters(specs, args.model, settings_from_args(args, QuantizeSettings))
    for request in requests:
        prompt = request.messages if request.messages is not None else request.prompt
        request.input_ids = encode_prompt(loaded.tokenizer, prompt, settings, loaded.task == "seq2seq")
    check_context(loaded.model.get_base_model().config, [r.input_ids for r in requests], settings.max_new_tokens)
    if args.input is None and args.output is None:
        stream_responses(loaded, requests, settings)
        return 0
    show_adapter = len(specs) > 1 or any(r.adapter != next(iter(specs)) for r in requests)
    write_rows(response_rows(loaded, requests, settings, show_adapter), args.output)
    return 0
