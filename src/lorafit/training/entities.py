"""Entity-level precision, recall and F1 over tag sequences, as ``seqeval`` computes them by default.

An entity is a run of words with one type. Tags are O or a prefix and a type (B-PER, I-PER, E-PER,
S-PER), so IOB1, IOB2 and IOBES data are all read by one rule, seqeval's lenient default (not its
``mode="strict"``): a malformed run such as I-PER without a B-PER still makes an entity, and a type
change inside a run ends it. Scores are micro averages over entities; a system that predicts no
entity has precision 0, as seqeval reports it (with a warning there). Tests compare these functions
with the installed ``seqeval`` on many tag sequences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

Entity = tuple[str, int, int]  # (type, first word, last word)


def _split(tag: str) -> tuple[str, str]:
    """("B", "PER") for B-PER, ("O", "") for O."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def extract_entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one sentence's tags, in order."""
    entities: list[Entity] = []
    start = None
    previous, previous_kind = "O", ""
    for i, tag in enumerate([*tags, "O"]):  # the O after the last tag closes an entity still open
        prefix, kind = _split(tag)
        typed_change = kind != previous_kind
        # a run ends after E/S, before B/S/O that follows B/I, and wherever the type changes
        ends = previous in ("E", "S") or (previous in ("B", "I") and prefix in ("B", "S", "O")) or \
            (previous != "O" and typed_change)
        # one starts at B/S, at I/E that follow O/E/S (a run with no B), and wherever the type changes
        starts = prefix in ("B", "S") or (prefix in ("I", "E") and previous in ("O", "E", "S")) or \
            (prefix != "O" and typed_change)
        if ends and start is not None:
            entities.append((previous_kind, start, i - 1))
            start = None
        if starts:
            start = i
        previous, previous_kind = prefix, kind
    return entities


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def entity_scores(true_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str]]) -> dict:
    """Micro precision/recall/F1 over entities, token accuracy, and per-type scores with their support."""
    true_set, predicted_set = set(), set()
    for sentence, (truth, guess) in enumerate(zip(true_tags, predicted_tags)):
        true_set |= {(sentence, *entity) for entity in extract_entities(truth)}
        predicted_set |= {(sentence, *entity) for entity in extract_entities(guess)}
    hits = true_set & predicted_set
    per_kind = {}
    true_count, predicted_count, hit_count = (Counter(e[1] for e in s) for s in (true_set, predicted_set, hits))
    for kind in sorted(true_count | predicted_count):
        p, r = _ratio(hit_count[kind], predicted_count[kind]), _ratio(hit_count[kind], true_count[kind])
        per_kind[kind] = {"precision": p, "recall": r, "f1": _f1(p, r), "support": true_count[kind]}
    precision, recall = _ratio(len(hits), len(predicted_set)), _ratio(len(hits), len(true_set))
    pairs = [(t, g) for truth, guess in zip(true_tags, predicted_tags) for t, g in zip(truth, guess)]
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "accuracy": _ratio(sum(t == g for t, g in pairs), len(pairs)), "per_type": per_kind}


def format_entity_report(report: dict) -> str:
    """A terminal table: the overall figures, then precision/recall/F1 per entity type."""
    lines = [f"token accuracy {report['accuracy']:.4f}"]
    if "f1" not in report:
        return "\n".join(lines)
    lines[0] = (f"entity precision {report['precision']:.4f}   recall {report['recall']:.4f}   "
                f"F1 {report['f1']:.4f}   " + lines[0])
    kinds = report["per_type"]
    width = max(12, *(len(k) + 2 for k in kinds)) if kinds else 12
    lines += ["", f"{'type':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for kind, s in kinds.items():
        lines.append(f"{kind:<{width}}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}{s['support']:>10d}")
    return "\n".join(lines)
