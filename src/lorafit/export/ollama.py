"""An Ollama Modelfile for an exported GGUF: ``FROM`` the model, ``ADAPTER`` the LoRA, the chat template in Ollama's
Go-template syntax, and the stop tokens, so that ``ollama create NAME -f Modelfile`` gives a model that answers
as `lorafit generate` does (greedy decoding, as lorafit's default).

Ollama cannot run Jinja chat templates, so the template is taken apart by rendering it around marker texts:
each role's text before and after its content, the default system turn some templates add when the
conversation has none (SmolLM2's), and the generation prompt. Templates with logic beyond that (tools,
per-position rules) are refused rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.data import chat
from lorafit.errors import LorafitError

MARKERS = {"system": "Zq7sysmark", "user": "Zq7usermark", "assistant": "Zq7asstmark"}
MODELFILE = "Modelfile"


@dataclass
class ChatPieces:
    """A chat template as fixed texts: ``around[role]`` is the (before, after) of a message's content."""

    around: dict[str, tuple[str, str]]
    default_system: str
    generation_prompt: str

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as these pieces give it: what the Go template will produce."""
        head = "" if messages and messages[0]["role"] == "system" else self.default_system
        body = "".join(self.around[m["role"]][0] + m["content"] + self.around[m["role"]][1] for m in messages)
        return head + body + (self.generation_prompt if add_generation_prompt else "")


def _split(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise LorafitError(f"the chat template does not render {what} as plain text around its content, so it cannot "
                           "be written as an Ollama TEMPLATE: leave out --ollama and write the TEMPLATE by hand")
    before, _, after = text.partition(marker)
    return before, after


def chat_pieces(tokenizer) -> ChatPieces:
    """Take the tokenizer's chat template apart (see the module docstring), checked by rendering it back."""
    def render(*roles: str, generation: bool = False) -> str:
        messages = [{"role": role, "content": MARKERS[role]} for role in roles]
        return chat.render_messages(tokenizer, messages, add_generation_prompt=generation)

    system_before, system_after = _split(render("system"), MARKERS["system"], "a system message")
    with_system = render("system", "user")
    _, user_text = _split(with_system, MARKERS["system"], "a system message")
    user_before, user_after = _split(user_text.removeprefix(system_after), MARKERS["user"], "a user message")
    alone_before, _ = _split(render("user"), MARKERS["user"], "a user message")
    if not alone_before.endswith(user_before):
        raise LorafitError("the chat template renders a user message differently after a system message, so it "
                           "cannot be written as an Ollama TEMPLATE: leave out --ollama and write the TEMPLATE by hand")
    default_system = alone_before[: len(alone_before) - len(user_before)]
    _, reply_text = _split(render("system", "user", "assistant"), MARKERS["user"], "a user message")
    assistant_before, assistant_after = _split(reply_text.removeprefix(user_after), MARKERS["assistant"],
                                               "an assistant message")
    generation_prompt = render("system", "user", generation=True).removeprefix(with_system)
    pieces = ChatPieces({"system": (system_before, system_after), "user": (user_before, user_after),
                         "assistant": (assistant_before, assistant_after)}, default_system, generation_prompt)
    check_pieces(tokenizer, pieces)
    return pieces


def check_pieces(tokenizer, pieces: ChatPieces) -> None:
    """The pieces must reproduce the Jinja template on longer conversations than the ones they came from."""
    conversations = [
        [{"role": "user", "content": "Hello there."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for messages in conversations:
        if pieces.render(messages) != chat.render_messages(tokenizer, messages, add_generation_prompt=True):
            raise LorafitError("the chat template has rules beyond fixed texts around each message, so it cannot be "
                               "written as an Ollama TEMPLATE: leave out --ollama and write the TEMPLATE by hand")


def _go_text(text: str) -> str:
    """Literal text inside a Go template ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: ChatPieces) -> str:
    """The chat template in Ollama's Go-template syntax, over ``.Messages`` (no whitespace trimming: every
    newline of the original is literal text)."""
    parts = []
    if pieces.default_system:
        parts.append('{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
                     f"{_go_text(pieces.default_system)}{{{{ end }}}}")
    parts.append("{{ range .Messages }}")
    for keyword, role in zip(("if", "else if", "else if"), ("system", "user", "assistant")):
        before, after = pieces.around[role]
        parts.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(before)}{{{{ .Content }}}}{_go_text(after)}')
    parts.append("{{ end }}{{ end }}")
    parts.append(_go_text(pieces.generation_prompt))
    return "".join(parts)


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(model_file: str, adapter_file: str | None, tokenizer, stops: list[str]) -> str:
    """A Modelfile: paths as Ollama resolves them (relative ones from the Modelfile's folder)."""
    lines = [f"FROM {model_file}"]
    if adapter_file is not None:
        lines.append(f"ADAPTER {adapter_file}")
    if chat.has_chat_template(tokenizer):
        template = go_template(chat_pieces(tokenizer))
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    lines.append("PARAMETER temperature 0")  # greedy, as `lorafit generate` decodes by default
    return "\n".join(lines) + "\n"


def modelfile_path(output: Path) -> Path:
    return output.parent / MODELFILE


def modelfile_for(output: Path, model_file: Path, adapter_file: Path | None, tokenizer, stop_ids: list[int]) -> str:
    """The Modelfile for files exported to ``output``'s folder: those are named relative to it, the base by full path."""
    def for_ollama(path: Path) -> str:
        return f"./{path.name}" if path.resolve().parent == output.resolve().parent else str(path.resolve())

    if '"""' in (tokenizer.chat_template or ""):
        raise LorafitError('the chat template contains """, which ends an Ollama TEMPLATE: leave out --ollama')
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    return modelfile_text(for_ollama(model_file), for_ollama(adapter_file) if adapter_file else None, tokenizer, stops)

