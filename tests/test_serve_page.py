"""The playground page (``GET /``) in a real browser: headless Debian Chromium, driven by Playwright, against a
real ``lorafit serve`` on loopback with a tiny chat Llama adapter and a tiny BERT classifier adapter.

What the page shows is checked against what the HTTP API answers for the same request, so the page can
neither invent a reply nor drop part of the stream.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from lorafit.config import LoraConfig
from lorafit.inference.base_models import load_classifier
from lorafit.model import get_lora_model
from lorafit.inference.adapter_info import save_adapter_info

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
API_KEY = "page-test-key"
WORDS = ("user assistant system hello world good day how are you the a cat dog sat on mat red blue green one two "
         "three four five sun moon star tree river stone fire water wind rain snow cloud sky sea great awful film "
         "plot loved hated boring fun").split()
SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "[CLS]", "[SEP]", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
PROMPT = "hello how are you"
MAX_TOKENS = 8


def word_tokenizer(**kwargs):
    """Whitespace words; decoding joins them with spaces, so a streamed reply reads like the whole one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **kwargs)


def build_chat_adapter(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(pad_token="<pad>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    torch.manual_seed(1)
    adapter = get_lora_model(AutoModelForCausalLM.from_pretrained(root / "llama"),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                        task_type="CAUSAL_LM"))
    adapter.save_pretrained(root / "chat")
    save_adapter_info(root / "chat", {"task": "causal-lm", "base_model": str(root / "llama")})
    return root / "chat"


def build_classifier_adapter(root: Path) -> Path:
    from transformers import BertConfig, BertModel

    tokenizer = word_tokenizer(pad_token="<pad>", cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    base = load_classifier(str(root / "bert"), num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(2)
    adapter = get_lora_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                              modules_to_save=["classifier"], init_lora_weights=False,
                                              task_type="SEQ_CLS"))
    adapter.save_pretrained(root / "cls")
    save_adapter_info(root / "cls", {"task": "classification", "base_model": str(root / "bert"), "id2label": LABELS})
    return root / "cls"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``lorafit serve`` in its own process with both adapters and an API key; its URL."""
    root = tmp_path_factory.mktemp("serve-page")
    chat, cls = build_chat_adapter(root), build_classifier_adapter(root)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(root / "server.log", "w", encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--adapter", f"chat={chat}",
                                "--adapter", f"cls={cls}", "--port", str(port), "--api-key", API_KEY],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (root / "server.log").read_text(encoding="utf-8")[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "lorafit serve not ready after 120 s"
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the page test needs Debian's chromium "
                    "(apt-get update && apt-get install -y --no-install-recommends chromium; .ci/run does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS)
        yield context
        context.close()


@pytest.fixture
def page(browser_context, server):
    """The playground with the API key typed in; every request the page makes is recorded."""
    page = browser_context.new_page()
    page.requests = []
    page.errors = []
    page.on("request", lambda request: page.requests.append(request))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(server + "/")
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").dispatch_event("change")  # reloads the model list with the key
    page.wait_for_selector("#model option[value=cls]", state="attached", timeout=20_000)
    yield page
    assert not page.errors, page.errors
    page.close()


def api(server: str, path: str, body: dict) -> dict:
    response = httpx.post(server + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_are_listed_with_their_parent(page, server):
    listed = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]
    parents = {m["id"]: m["parent"] for m in listed}
    assert parents["chat"] and parents["cls"]
    options = {o.get_attribute("value"): o.inner_text() for o in page.locator("#model option").all()}
    assert set(options) == set(parents)
    assert f"adapter of {parents['chat']}" in options["chat"] and f"adapter of {parents['cls']}" in options["cls"]


def test_chat_reply_streams_and_equals_the_api_answer(page, server):
    expected = api(server, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": PROMPT}],
                                                    "max_tokens": MAX_TOKENS, "temperature": 0})
    expected_text = expected["choices"][0]["message"]["content"]
    assert expected_text.strip(), "the tiny model's greedy reply is empty: pick another PROMPT"

    page.get_by_label("Adapter or base model").select_option("chat")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    page.get_by_label("Message").fill(PROMPT)
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30_000)

    assert reply.locator(".content").inner_text() == expected_text
    sent = [r for r in page.requests if r.url.endswith("/v1/chat/completions")]
    assert len(sent) == 1
    assert sent[0].post_data_json["stream"] is True and sent[0].headers["authorization"] == f"Bearer {API_KEY}"
    chunks = int(page.locator("#chat-status").inner_text().split(" after ")[1].split()[0])
    assert chunks > 1, "the reply arrived in one piece: it was not streamed"
    assert page.locator("#error").inner_text() == ""  # the alert region is empty (and hidden)


def test_classifier_probabilities_are_shown(page, server):
    texts = ["great film loved the plot", "boring plot hated it"]
    expected = api(server, "/v1/classify", {"model": "cls", "input": texts})["data"]

    page.get_by_label("Adapter or base model").select_option("cls")
    page.get_by_label("Texts, one per line").fill("\n".join(texts))
    page.get_by_role("button", name="Classify").click()
    page.wait_for_selector(".result >> nth=1", timeout=30_000)

    results = page.locator(".result").all()
    assert len(results) == len(texts)
    for shown, answer in zip(results, sorted(expected, key=lambda a: a["index"])):
        assert shown.get_attribute("data-label") == answer["label"]
        bars = shown.locator(".bar").all()
        assert [b.get_attribute("data-label") for b in bars] == list(LABELS.values())
        for bar in bars:
            probability = answer["probs"][bar.get_attribute("data-label")]
            assert float(bar.get_attribute("data-prob")) == pytest.approx(probability, abs=1e-9)
            assert bar.locator(".value").inner_text() == f"{100 * probability:.1f}%"
            meter = bar.get_by_role("meter")
            assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(probability, abs=1e-9)
        top = shown.locator(".bar.top").get_attribute("data-label")
        assert top == answer["label"] == max(answer["probs"], key=answer["probs"].get)


def test_errors_show_the_servers_message(page, server):
    page.get_by_label("Adapter or base model").select_option("chat")
    page.get_by_label("Max tokens").fill("100000")
    page.get_by_label("Message").fill(PROMPT)
    page.get_by_role("button", name="Send").click()
    page.wait_for_selector(".msg.assistant[data-state=error]", timeout=30_000)
    body = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 100000})
    assert 400 <= body.status_code < 500
    alert = page.get_by_role("alert").inner_text()
    assert f"HTTP {body.status_code}" in alert and body.json()["error"]["message"] in alert

    page.get_by_label("API key").fill("wrong-key")
    page.get_by_label("API key").dispatch_event("change")
    page.wait_for_function("document.getElementById('error').textContent.includes('HTTP 401')", timeout=20_000)


def test_the_page_loads_nothing_from_elsewhere(page, server):
    html = httpx.get(server + "/").text
    assert "http://" not in html and "https://" not in html and 'src="//' not in html and 'href="//' not in html
    assert page.requests and all(r.url.startswith(server) or r.url.startswith("data:") for r in page.requests), \
        [r.url for r in page.requests]
    assert page.title() == "lorafit playground"
