"""Per-request decoding: choosing each next token, and turning tokens into text deltas.

Both work one request at a time on its own row of the batch's logits, so a request decodes the
same whatever else shares its batch: greedy is an argmax, sampling draws from the request's own
seeded generator.
"""

from __future__ import annotations

import torch


def sampler(temperature: float, top_p: float, seed: int | None, device: torch.device):
    """A function from one row of logits (vocab,) to the next token id, for one request."""
    if temperature == 0:
        return lambda logits: int(logits.argmax())
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def sample(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            probs = _top_p(probs, top_p)
        return int(torch.multinomial(probs, 1, generator=generator))

    return sample


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the likeliest tokens whose probabilities add up to ``top_p`` (always at least the first)."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability mass ranked above each token
    sorted_probs[before >= top_p] = 0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


class TextStream:
    """Generated ids in, text deltas out: never half a UTF-8 character, never a stop string or the part
    of the text that may yet become one (OpenAI leaves the matched stop out of the reply)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that token makes safe to send ("" while it is held back); sets ``stopped`` on a stop string."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = self._stop_at(text)
        if end is not None:
            self.stopped = True
            return self._send(text, end)
        if text.endswith("\ufffd"):  # the last token ends inside a multi-byte character
            return ""
        return self._send(text, len(text) - self._held(text))

    def finish(self) -> str:
        """Everything still held back, when the request ends without a stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._send(text, len(text))

    def _send(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts, looking only where a new one can be (from just before ``sent``)."""
        found = None
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1 and (found is None or at < found):
                found = at
        return found

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string: it may still become one."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if stop.startswith(text[len(text) - size:]):
                    held = size
                    break
        return held
