"""Where a `lorafit train` run spends its time: cProfile (Python level) and torch.profiler (operators).

    python bench/profile_train.py classifier --examples 800   # minilm on bench/data, 50 steps + eval/save
    python bench/profile_train.py llm --examples 40           # smollm2 on the built-in instruction set
    python bench/profile_train.py classifier --peft           # the same run through PEFT + Trainer

Prints the run's phases (cumulative Python time of the functions that matter) and its operators
grouped into categories (matmul, attention, LoRA's own small ops, optimizer, ...), self time each.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import classifier, llm
from bench.fixtures import Setup, Sizes, prepare, write_jsonl

PHASES = ("run_training", "evaluate_classifier", "evaluate_lm", "save_checkpoint", "save_pretrained", "restore_best",
          "collate", "collate_counting", "backward", "step", "causal_loss", "classification_loss", "forward",
          "print_predictions", "score_heldout", "plot_curves", "tokenize", "tokenize_split", "_inner_training_loop",
          "training_step", "evaluate", "_save_checkpoint", "compute_loss", "__next__")

CATEGORIES = [  # first match wins
    ("attention", ("scaled_dot_product", "softmax", "baddbmm", "_efficient_attention", "flash_attention")),
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("Optimizer", "_foreach", "adam", "lerp", "aten::sqrt", "zero_")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("norm/activation", ("layer_norm", "rms", "gelu", "silu", "tanh", "rsqrt", "aten::pow", "aten::mean")),
    ("dropout", ("dropout", "bernoulli", "native_dropout")),
    ("embedding/index", ("embedding", "index", "gather", "masked_select", "nonzero", "where")),
    ("copy/cast/pad", ("copy_", "aten::to", "_to_copy", "cat", "stack", "aten::pad", "contiguous", "clone", "tensor")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::neg", "aten::fill", "aten::ones",
                     "aten::zeros", "aten::empty", "aten::ne", "aten::eq", "aten::sum", "aten::cos", "aten::sin")),
]


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(key in name for key in keys):
            return label
    return "other"


def run(kind: str, use_peft: bool, setup: Setup, examples: int, options: dict) -> None:
    if kind == "classifier":
        lines = Path(setup.train_file).read_text(encoding="utf-8").splitlines()[:examples]
        setup.train_file = str(Path(setup.workdir) / "profile_train.jsonl")
        Path(setup.train_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
        val = Path(setup.validation_file).read_text(encoding="utf-8").splitlines()[:max(16, examples // 6)]
        setup.validation_file = str(Path(setup.workdir) / "profile_validation.jsonl")
        Path(setup.validation_file).write_text("\n".join(val) + "\n", encoding="utf-8")
        (classifier.run_peft if use_peft else classifier.run_lorafit)(setup, options)
    else:
        from bench.fixtures import instruct_records

        setup.llm_train_file = str(write_jsonl(Path(setup.workdir) / "profile_instruct.jsonl", instruct_records(examples)))
        (llm.run_peft if use_peft else llm.run_lorafit)(setup, {})


def profiled(kind: str, use_peft: bool, setup: Setup, examples: int, options: dict):
    """cProfile's stats and torch.profiler's operator events of one run."""
    from torch.profiler import ProfilerActivity, profile

    profiler = cProfile.Profile()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiler.enable()
        run(kind, use_peft, setup, examples, options)
        profiler.disable()
    return pstats.Stats(profiler, stream=io.StringIO()), prof.key_averages()


def category_seconds(events) -> dict[str, float]:
    """Operator self time (seconds) per category, largest first."""
    groups: dict[str, float] = {}
    for e in events:
        groups[category(e.key)] = groups.get(category(e.key), 0.0) + e.self_cpu_time_total / 1e6
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


PROFILE_EXAMPLES = {"classifier": 320, "llm": 40}
"""The suite's `profile` case: 20 classifier steps of 16 (+ evaluation and save), 10 LLM steps of 4."""


def measure(setup: Setup, options: dict) -> dict:
    """The suite's `profile` case for one side: where a short training run's operator time goes, by category."""
    kind, use_peft = options["kind"], bool(options.get("peft"))
    examples = 32 if setup.smoke else PROFILE_EXAMPLES[kind]
    stats, events = profiled(kind, use_peft, setup, examples, {})
    seconds = category_seconds(events)
    total = sum(seconds.values())
    return {"examples": examples, "wall_seconds": round(max(v[3] for v in stats.stats.values()), 2),
            "operator_seconds": round(total, 2),
            "categories": {k: {"seconds": round(v, 3), "share": round(v / total, 4) if total else None}
                           for k, v in seconds.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("classifier", "llm"))
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--peft", action="store_true", help="profile the PEFT + Trainer run instead")
    parser.add_argument("--grouped", action="store_true", help="with --peft: train_sampling_strategy=group_by_length")
    parser.add_argument("--smoke", action="store_true", help="tiny models (checks the script)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as work:
        setup = prepare(args.smoke, Path(work), Sizes.smoke() if args.smoke else Sizes.full())
        stats, events = profiled(args.kind, args.peft, setup, args.examples, {"group_by_length": args.grouped})

    total = max(v[3] for v in stats.stats.values())
    print(f"\n== Python phases (cumulative seconds; whole run {total:.1f} s) ==")
    rows = []
    for (file, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
        if name in PHASES and ("lorafit" in file or "transformers" in file or "torch/optim" in file
                               or "torch/_tensor" in file or "bench" in file):
            rows.append((cumulative, calls, f"{Path(file).parent.name}/{Path(file).name}:{name}"))
    for cumulative, calls, where in sorted(rows, reverse=True)[:args.top]:
        print(f"{cumulative:9.2f} s {100 * cumulative / total:5.1f}%  {calls:7d} calls  {where}")

    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\n== operator self time by category (total {self_total:.1f} s) ==")
    for label, seconds in category_seconds(events).items():
        print(f"{seconds:9.2f} s {100 * seconds / self_total:5.1f}%  {label}")
    print(f"\n== top {args.top} operators by self time ==")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"{e.self_cpu_time_total / 1e6:9.2f} s {100 * e.self_cpu_time_total / 1e6 / self_total:5.1f}%  "
              f"{e.count:8d}x  {e.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
