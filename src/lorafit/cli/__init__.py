"""The `lorafit` command line: one sub-command per module (train, eval, predict, merge, generate, export, serve)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import typing
from typing import Any, Sequence

from lorafit.errors import Interrupted, LorafitError

DESCRIPTION = """\
LoRA fine-tuning for Hugging Face transformers models, offline on a laptop CPU or on GPUs.

  lorafit train                       fine-tune the built-in classifier (MiniLM on sentiment data)
  lorafit train --task causal-lm      instruction-tune the built-in LLM (SmolLM2-135M-Instruct)
  lorafit eval --adapter DIR --data FILE
  lorafit predict --adapter DIR "a text" "another text"
  lorafit generate --adapter DIR "a prompt"
  lorafit merge --adapter DIR --output DIR
  lorafit merge --adapter DIR --adapter DIR --weights 0.6 0.4 --combination ties --density 0.5 --output DIR
  lorafit export --adapter DIR --output FILE.gguf   (llama.cpp, Ollama; --format onnx for classifiers)
  lorafit serve --adapter NAME=DIR    an OpenAI-compatible HTTP server, requests batched across adapters

Run `lorafit COMMAND --help` for each command's options."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr with exit code 2, like every other bad input."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of a config dataclass, its help text taken from the field's docstring."""
    from lorafit.training.settings import field_docs

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = base[0]
        # argparse %-formats help texts: a literal '%' (as in "30% slower") must be doubled
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": docs.get(f.name, "").replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            kwargs.update(nargs="+", type=item, metavar="NAME" if item is str else item.__name__.upper())
        else:
            kwargs.update(type=kind, metavar=f.name.upper() if kind is str else kind.__name__.upper())
        default = f.default
        if default is not None and default is not dataclasses.MISSING and kind is not bool:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag, **kwargs)


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """--adapter and --model, as every single-adapter command spells them."""
    parser.add_argument("--adapter", required=True, help="adapter directory (a run's best/ folder)")
    parser.add_argument("--model", help="base model, if not the one the adapter was trained on")


def settings_from_args(args: argparse.Namespace, cls: type):
    """The config dataclass of the flags ``add_dataclass_flags`` made; fields not given keep their defaults."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    from lorafit.cli import evaluate, export, generate, merge, predict, serve, train

    parser = _Parser(prog="lorafit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorafit {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    for module in (train, evaluate, predict, merge, generate, export, serve):
        sub = commands.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _version() -> str:
    from lorafit import __version__

    return __version__


def _quiet_libraries() -> None:
    """Keep the terminal to lorafit's own output: library chatter hides what matters."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every model load
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        with _sigterm_as_interrupt():
            _quiet_libraries()
            return args.run(args)
    except LorafitError as err:
        print(f"lorafit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # training says at which step, and how to resume
        print(f"lorafit {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception as err:  # a full disk, a read-only folder: the environment, not a bug to trace
        from lorafit.files import as_os_error, describe_os_error

        os_error = as_os_error(err)
        if os_error is None:
            raise
        writing = getattr(args, "output", None) or getattr(args, "output_dir", None)
        print(f"lorafit {args.command}: error: {describe_os_error(os_error, writing)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends a command as Ctrl-C does. Python lets only the main thread set handlers, so
    ``main`` called from another thread (an embedding application, a test guard) keeps the default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(exit_code=128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
