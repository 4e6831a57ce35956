"""Deterministic generator for the benchmark review corpus.

Reviews are composed from hand-written phrase pools: an optional opener, one
to six polar clauses about a subject from one of many domains, optional
neutral details, an optional concessive clause of the opposite polarity and
an optional closer.  The label is the majority polarity of the polar clauses
(a concession is only ever added as a minority), so it always follows from the
text.  Lengths run from a few words to roughly eighty.

    python bench/make_reviews.py   # writes bench/data/reviews_{train,validation}.jsonl

Standard library only.
"""
from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

# domain -> (subjects, positive clauses, negative clauses); clauses follow a subject.
DOMAINS = {
    "film": (["the film", "this movie", "the sequel", "the remake", "the thriller", "this comedy", "the new drama"],
             ["kept me hooked from the first scene", "has a genuinely clever script", "is beautifully shot",
              "made the whole audience laugh", "lands an ending that actually earns its tears",
              "features a career-best performance from the lead"],
             ["drags on for far too long", "wastes a talented cast", "has a plot full of holes",
              "is predictable from the opening minutes", "ends in a confusing mess", "has dialogue nobody would ever say"]),
    "book": (["the novel", "this book", "the memoir", "the audiobook", "the second volume", "the thriller I picked up"],
             ["is impossible to put down", "is written with real warmth and wit", "has characters that feel alive",
              "taught me more than any class I took", "has a final chapter I keep rereading"],
             ["loses its way in the middle", "is badly in need of an editor", "has characters made of cardboard",
              "repeats the same point for three hundred pages", "falls apart in the last act"]),
    "restaurant": (["the restaurant", "this little bistro", "the trattoria", "the cafe on the corner", "the new place downtown",
                    "the diner"],
                   ["served the best meal I have had in years", "has friendly, attentive staff",
                    "gets every dish out hot and fast", "makes desserts worth the trip alone", "charges very fair prices"],
                   ["served food that was cold and bland", "kept us waiting over an hour for mains",
                    "has rude and dismissive staff", "charges far too much for tiny portions", "left us feeling ill afterwards"]),
    "hotel": (["the hotel", "the resort", "the guesthouse", "the hostel", "the inn", "the B&B"],
              ["was spotless and quiet", "has the comfiest beds I have ever slept in", "has staff who go out of their way to help",
               "is in a perfect spot for exploring", "serves a generous breakfast"],
              ["was dirty and smelled of damp", "has paper-thin walls", "looked nothing like the photos",
               "has staff who could not care less", "charged hidden fees at checkout"]),
    "gadget": (["the headset", "this laptop", "the phone", "the smartwatch", "the speaker", "the tablet"],
               ["has a battery that lasts for days", "is fantastic for the price", "feels solid and well made",
                "set up in five minutes", "has worked flawlessly since day one"],
               ["stopped working after two weeks", "drains its battery in a few hours", "feels cheap and flimsy",
                "keeps dropping the connection", "overheats whenever I use it"]),
    "appliance": (["the vacuum", "this blender", "the kettle", "the air fryer", "the coffee machine", "the toaster"],
                  ["does its job brilliantly", "is sturdy and well designed", "was easy to set up",
                   "still looks brand new after a year", "is quiet and easy to clean"],
                  ["broke the second time I used it", "arrived scratched and dented", "is unbearably loud",
                   "started falling apart within a month", "came with parts missing"]),
    "app": (["the app", "the new update", "this budgeting tool", "the website", "the banking app", "the photo editor"],
            ["is fast and intuitive", "has never crashed on me", "syncs perfectly across my devices",
             "makes a tedious chore genuinely painless", "respects my privacy"],
            ["crashes constantly", "is full of aggressive ads", "lost all my data", "hides basic features behind a paywall",
             "is slow and confusing to navigate"]),
    "game": (["the game", "this indie title", "the expansion", "the multiplayer mode", "the remaster"],
             ["has combat that feels amazing", "is packed with clever puzzles", "offers hundreds of hours of fun",
              "has a soundtrack I still hum", "runs smoothly even on old hardware"],
             ["is riddled with game-breaking bugs", "is built around pay-to-win microtransactions", "gets repetitive within an hour",
              "has clunky controls and a broken camera", "corrupted my save file"]),
    "album": (["the album", "the new record", "the band's latest", "this EP", "the soundtrack album"],
              ["sounds incredible", "has no weak tracks at all", "gets better with every listen",
               "gave me goosebumps more than once", "has melodies that stick in your head for days"],
              ["sounds muddy and overproduced", "is forgettable filler from start to finish", "has lyrics that are painfully clichéd",
               "sounds like every other song on the radio", "runs out of ideas by the third track"]),
    "concert": (["the concert", "the gig", "the live show", "the festival set", "the recital"],
                ["had the whole crowd singing along", "sounded amazing in that venue", "ran well past its scheduled end",
                 "was the best night out in ages", "left everyone buzzing"],
                ["started two hours late", "lasted barely forty minutes", "sounded muddy and far too loud",
                 "was so overcrowded we never saw the stage", "ended without a word to the crowd"]),
    "service": (["the plumbing firm", "the cleaning company", "the removal company", "the repair service", "the electrician's firm"],
                ["fixed everything quickly and charged what it quoted", "was patient and genuinely helpful",
                 "turned up exactly on time", "left the place spotless", "went above and beyond"],
                ["never showed up", "kept me on hold for two hours", "charged almost double the quote",
                 "left a mess behind", "made the problem worse"]),
    "travel": (["the tour", "the trip", "the cruise", "the holiday package", "the excursion", "the guided hike"],
               ["was smooth and relaxing", "had a guide who clearly loved the place", "was worth every penny",
                "showed us views I will never forget", "ran perfectly on time"],
               ["was delayed again and again", "was rushed and overcrowded", "ended with our luggage lost",
                "was cancelled with no refund", "had cramped seats and surly staff"]),
    "clothing": (["the jacket", "this pair of boots", "the coat", "this dress", "the backpack", "the hoodie"],
                 ["fits perfectly", "is warm and really well made", "gets compliments every time I wear it",
                  "survived a month of hard use without a scratch", "is so comfortable I forget I have it on"],
                 ["fell apart after one wash", "gave me blisters on the first day", "is nothing like the photos",
                  "runs two sizes too small", "ripped at the seams within a week"]),
    "course": (["the course", "the workshop", "the online class", "the evening class", "the bootcamp"],
               ["explains tricky ideas really clearly", "has an instructor who is patient and encouraging",
                "was worth every minute", "gave me skills I use at work every day", "is well paced and hands-on"],
               ["is just someone reading slides in a monotone", "is hopelessly out of date",
                "never answered a single question", "was a sales pitch dressed up as training", "is badly organised"]),
}
# generic predicates usable with any subject: "{subject} was {intensifier} {adjective}" or "... was {noun phrase}"
POS_ADJ = ["excellent", "wonderful", "superb", "delightful", "fantastic", "brilliant", "impressive", "lovely",
           "outstanding", "terrific", "charming", "reliable", "first-rate", "great"]
NEG_ADJ = ["awful", "terrible", "dreadful", "disappointing", "useless", "tedious", "poor", "frustrating",
           "shoddy", "overpriced", "mediocre", "unpleasant", "shabby", "second-rate"]
POS_NOUN = ["a real pleasure", "a joy", "great value for money", "a lovely surprise", "the highlight of my month",
            "money well spent"]
NEG_NOUN = ["a waste of money", "a total mess", "a huge letdown", "a complete disaster", "a rip-off",
            "the low point of my month"]
INTENS = ["", "", "", "really ", "genuinely ", "absolutely ", "truly ", "pretty ", "so ", "utterly "]
HEDGES = ["I think ", "to be honest, ", "frankly, ", "in my opinion ", "overall, ", "for me, ", "honestly, "]
OPENERS = {
    "neutral": ["Long-time customer here.", "First review I've ever written.", "Okay, so.", "Quick review:",
                "Update after a month:", "Here's my honest take.", "Been meaning to write this for a while.",
                "Short version:", "My partner picked this one.", "Going to keep this brief."],
    "positive": ["What a find!", "Wow.", "I was pleasantly surprised.", "Honestly, I'm impressed.", "So glad we tried it."],
    "negative": ["Where do I start.", "Oh dear.", "I had high hopes.", "Sigh.", "Big mistake."],
}
DETAILS = ["I paid full price", "a friend recommended it", "I had read mixed reviews", "I went in with no expectations",
           "this was my third time", "I had compared options for weeks", "we are not easy to please",
           "I am usually very picky", "I have tried a few alternatives", "my expectations were fairly high"]
CLOSERS = {
    "positive": ["Highly recommend.", "Would happily go back.", "Five stars.", "Can't wait to try it again.",
                 "Worth every penny.", "Already told all my friends.", "Loved it.", "Ten out of ten."],
    "negative": ["Avoid.", "Never again.", "One star.", "Save your money.", "Really disappointed.",
                 "I want my money back.", "Would not recommend.", "Not going back."],
}
CONNECTIVES = [", and ", ", and ", "; ", ". Also, ", ", plus ", ". On top of that, ", ". ", ". ", ", and honestly "]
CONCESSIVE = ["though ", "although ", "even if ", "admittedly "]
CLAUSE_WEIGHTS = [34, 24, 16, 12, 8, 6]  # number of polar clauses: 1..6, many short, long tail


def _predicates(rng: random.Random, polarity: str, domain: str, k: int) -> list[str]:
    """``k`` distinct predicates of one polarity: domain-specific ones and generic adjective/noun ones."""
    positive = polarity == "positive"
    specific = rng.sample(DOMAINS[domain][1 if positive else 2], k=len(DOMAINS[domain][1 if positive else 2]))
    adjs = rng.sample(POS_ADJ if positive else NEG_ADJ, k=k)
    nouns = rng.sample(POS_NOUN if positive else NEG_NOUN, k=min(k, len(POS_NOUN)))
    out = []
    for i in range(k):
        r = rng.random()
        if specific and r < 0.55:
            out.append(specific.pop())
        elif nouns and r < 0.7:
            out.append(f"{rng.choice(['was', 'is', 'turned out to be'])} {nouns.pop()}")
        else:
            verb = rng.choice(["was", "is", "felt", "turned out to be", "seemed"])
            out.append(f"{verb} {rng.choice(INTENS)}{adjs[i]}")
    return out


def _subject(rng: random.Random, subject: str, first: bool) -> str:
    return subject if first else rng.choice([subject, "it", "it", "it", "the whole thing"])


def _style(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.15:  # SST-2 style: lowercase, spaced punctuation
        for p in [".", ",", "!", ";", ":"]:
            text = text.replace(p, f" {p}")
        text = text.lower().replace("can't", "ca n't").replace("won't", "wo n't").replace("n't", " n't")
        return " ".join(re.sub(r"(\w)'(s|m|re|ve|ll|d)\b", r"\1 '\2", text).split())
    if r < 0.25:  # chatty: lowercase, no final full stop
        return text.lower().rstrip(".")
    if r < 0.30:
        return text.rstrip(".") + "!"
    return text


def _review(rng: random.Random, label: str) -> str:
    other = "negative" if label == "positive" else "positive"
    domain = rng.choice(sorted(DOMAINS))
    subject = rng.choice(DOMAINS[domain][0])
    k = rng.choices(range(1, 7), weights=CLAUSE_WEIGHTS)[0]
    clauses = [f"{_subject(rng, subject, i == 0)} {p}" for i, p in enumerate(_predicates(rng, label, domain, k))]
    text = (rng.choice(HEDGES) if rng.random() < 0.4 else "") + clauses[0]
    text = text[0].upper() + text[1:]
    details = rng.sample(DETAILS, k=len(DETAILS))
    for c in clauses[1:]:
        sep = rng.choice(CONNECTIVES)
        text += sep + (c[0].upper() + c[1:] if sep.endswith(". ") else c)
        if rng.random() < 0.15:
            text += f" ({details.pop()})"
    # a minority concession of the other polarity: never flips the majority
    if k >= 2 and rng.random() < 0.25:
        text += ", " + rng.choice(CONCESSIVE) + "it " + _predicates(rng, other, domain, 1)[0]
    text += "."
    if rng.random() < 0.3:
        kind = rng.choice(["neutral", "neutral", label])
        text = rng.choice(OPENERS[kind]) + " " + text
    if rng.random() < 0.2:
        text += f" For context, {details.pop()}."
    if rng.random() < 0.4:
        text += " " + rng.choice(CLOSERS[label])
    return _style(rng, text)


def make_reviews(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """Return ``n`` unique reviews ``{"text", "label"}``, half positive (the extra one, for odd
    ``n``, negative), in a shuffled order fully determined by ``seed``.  Texts in ``exclude`` are
    never produced."""
    rng = random.Random(seed)
    labels = ["positive"] * (n // 2) + ["negative"] * (n - n // 2)
    rng.shuffle(labels)
    seen, out = set(exclude), []
    for label in labels:
        for _ in range(1000):
            text = _review(rng, label)
            if text not in seen:
                break
        else:
            raise RuntimeError("phrase pools too small for the requested number of unique reviews")
        seen.add(text)
        out.append({"text": text, "label": label})
    return out


def _histogram(rows: list[dict]) -> str:
    lengths = sorted(len(r["text"].split()) for r in rows)
    buckets = Counter(min(w // 10, 8) for w in lengths)
    lines = [f"words: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}"]
    for b in range(9):
        label = f"{b * 10:>3}-{b * 10 + 9:<3}" if b < 8 else " 80+   "
        lines.append(f"{label} {buckets.get(b, 0):5d} {'#' * (buckets.get(b, 0) // 20)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    out_dir = Path(__file__).resolve().parent / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    train = make_reviews(3000, seed=0)
    validation = make_reviews(500, seed=1, exclude={r["text"] for r in train})
    for name, rows in (("reviews_train.jsonl", train), ("reviews_validation.jsonl", validation)):
        with open(out_dir / name, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        pos = sum(r["label"] == "positive" for r in rows)
        print(f"{out_dir / name}: {len(rows)} rows, {pos} positive / {len(rows) - pos} negative")
        print(_histogram(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
