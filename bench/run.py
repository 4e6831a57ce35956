"""lorafit vs PEFT + Trainer benchmark suite.

    python bench/run.py                      # full CPU suite (about 30 min), writes bench/results.{md,json}
    python bench/run.py --smoke --out /tmp/b # tiny models built from configs, seconds; what CI runs
    python bench/run.py --cases classifier,inference --repeats 5
    python bench/run.py --cases serve --update  # re-run one case into the committed results
    python bench/run.py --cases gpu --out /tmp/gpu  # on a CUDA machine; keep its results.json as
                                                    # bench/results_gpu.json and results.md shows it

Training runs each get a fresh process and alternate lorafit / PEFT / PEFT-grouped, ``--repeats``
times, so that machine drift hits both sides; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.common import BENCH, environment, load_average, median
from bench.fixtures import Setup, Sizes, prepare
from bench.worker import measure, measure_in_subprocess

CASES = ("classifier", "inference", "lora_ops", "mixed", "switching", "llm", "scaling", "serve", "qlora", "profile",
         "shared", "gpu")
CLASSIFIER_VARIANTS = {"lorafit": ("classifier/lorafit", {}), "peft": ("classifier/peft", {}),
                       "peft_grouped": ("classifier/peft", {"group_by_length": True}),
                       "lorafit_all_linear": ("classifier/lorafit", {"targets": "all-linear"}),
                       "peft_all_linear": ("classifier/peft", {"targets": "all-linear"})}
# bf16 autocast on both sides (lorafit --mixed-precision bf16; Trainer bf16=True), where the CPU has fast bf16
CLASSIFIER_BF16_VARIANTS = {"lorafit_bf16": ("classifier/lorafit", {"config": {"mixed_precision": "bf16"}}),
                            "peft_bf16": ("classifier/peft", {"bf16": True})}
LLM_VARIANTS = {"lorafit": ("llm/lorafit", {}), "peft": ("llm/peft", {})}
QLORA_VARIANTS = {side: ("qlora", {"side": side}) for side in ("fp32", "lorafit-4bit", "peft")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models and data: checks the harness in seconds")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--repeats", type=int, help="classifier runs per variant (default 3; smoke 1)")
    parser.add_argument("--llm-repeats", type=int, help="LLM runs per side (default 3; smoke 1)")
    parser.add_argument("--llm-examples", type=int, help="instruction examples in the LLM epoch (default 400)")
    parser.add_argument("--out", default=str(BENCH), help="folder for results.md and results.json (default bench/)")
    parser.add_argument("--gpu-results", default=str(BENCH / "results_gpu.json"),
                        help="results.json of a GPU run on another machine, shown in results.md when this run "
                             "measures no GPU itself (default bench/results_gpu.json, used when present)")
    parser.add_argument("--workdir", help="scratch folder for runs and logs (default OUT/.work)")
    parser.add_argument("--update", action="store_true",
                        help="put this run's cases into OUT/results.json in place of the same cases of an earlier "
                             "run, keeping the others (each case records when and under what load it ran)")
    parser.add_argument("--threads", type=int, help="torch threads in every measurement (default: torch's own "
                        "choice, all cores; smoke: 1, as tiny ops on busy shared cores stall on thread hand-offs)")
    isolate = parser.add_mutually_exclusive_group()
    isolate.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                         help="one fresh process per measurement (default, except with --smoke)")
    isolate.add_argument("--no-isolate", dest="isolate", action="store_false", help="run everything in this process")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.llm_repeats = args.llm_repeats or (1 if args.smoke else 3)
    args.isolate = (not args.smoke) if args.isolate is None else args.isolate
    args.threads = args.threads or (1 if args.smoke else None)
    return args


class Runner:
    def __init__(self, setup: Setup, isolate: bool, log_dir: Path) -> None:
        self.setup, self.isolate, self.log_dir, self.count = setup, isolate, log_dir, 0

    def __call__(self, name: str, options: dict | None = None) -> dict:
        self.count += 1
        tag = f"{self.count:02d}-{name.replace('/', '-')}"
        print(f"[bench] {time.strftime('%H:%M:%S')} {tag} {options or ''} (load {load_average()})", flush=True)
        if self.isolate:
            result = measure_in_subprocess(name, self.setup, options or {}, self.log_dir, tag)
        else:
            result = measure(name, self.setup, options)
        shown = {k: v for k, v in result.items() if not isinstance(v, dict)}
        print(f"[bench]   -> {json.dumps(shown)[:400]}", flush=True)
        return result


def alternate(run: Runner, variants: dict, repeats: int) -> dict:
    """Run every variant once per round, round after round; medians of each figure per variant."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (measurement, options) in variants.items():
            runs[name].append(run(measurement, options))
    out = {}
    for name, results in runs.items():
        good = [r for r in results if "error" not in r]
        keys = {k for r in good for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[name] = {"median": {k: median(r.get(k) for r in good) for k in sorted(keys)}, "runs": results}
        if not good:
            out[name]["error"] = results[0].get("error") if results else "not run"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out_dir / ".work"
    sizes = Sizes.smoke() if args.smoke else Sizes.full()
    if args.llm_examples:
        sizes.llm_examples = args.llm_examples
    import torch

    saved = torch.get_num_threads(), {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # worker processes
        torch.set_num_threads(args.threads)
    try:
        run_suite(args, out_dir, workdir, sizes, argv)
    finally:  # a caller running the smoke suite in its own process gets its settings back
        torch.set_num_threads(saved[0])
        for key, value in saved[1].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print(f"[bench] wrote {out_dir / 'results.md'} and {out_dir / 'results.json'}")
    return 0


def run_suite(args: argparse.Namespace, out_dir: Path, workdir: Path, sizes: Sizes, argv: list[str] | None) -> None:
    gpu_only = args.cases == ["gpu"]
    setup = prepare(args.smoke, workdir, sizes, cpu_models=not gpu_only)
    run = Runner(setup, args.isolate, workdir / "logs")
    results = {"meta": {**environment(), "smoke": args.smoke, "isolated_processes": args.isolate,
                        "repeats": args.repeats, "threads": args.threads, "llm_repeats": args.llm_repeats, "cases": args.cases,
                        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_average(),
                        "sizes": setup.to_json()["sizes"]},
               "cases": {}}
    if args.update:
        results = earlier_results(out_dir, results["meta"])
    cases = results["cases"]

    def save() -> None:
        # an update's times and load are its own; the earlier run's stay as they were
        meta = results["meta"]["updates"][-1] if args.update else results["meta"]
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        meta["load_average_end"] = load_average()
        report.write(results, out_dir)

    if not args.update:  # an update keeps the earlier run's peak and parameter counts, which its GFLOP/s use
        cases["matmul"] = run("matmul")
        if not gpu_only:
            cases["params"] = model_params(setup)
    if "classifier" in args.cases:
        cases["classifier"] = {"tokens": run("classifier/tokens"),
                               **alternate(run, classifier_variants(), args.repeats)}
        save()
    if "llm" in args.cases:
        cases["llm"] = alternate(run, LLM_VARIANTS, args.llm_repeats)
        save()
    for case in ("inference", "lora_ops", "mixed", "switching"):
        if case in args.cases:
            cases[case] = run(case)
            save()
    if "scaling" in args.cases:
        cases["scaling"] = run("scaling")
        save()
    if "serve" in args.cases:
        cases["serve"] = run("serve")
        save()
    if "qlora" in args.cases:
        cases["qlora"] = alternate(run, QLORA_VARIANTS, args.llm_repeats)
        save()
    if "profile" in args.cases:
        cases["profile"] = {side: run("profile", {"kind": kind, "peft": peft}) for side, (kind, peft) in
                            {"classifier_lorafit": ("classifier", False), "classifier_peft": ("classifier", True),
                             "llm_lorafit": ("llm", False), "llm_peft": ("llm", True)}.items()}
        save()
    if "gpu" in args.cases:
        cases["gpu"] = gpu_case(run, args.smoke)
    if "shared" in args.cases:  # last: its busy processes raise the load average for a minute after
        cases["shared"] = run("shared")
    if not args.smoke and _get_device(cases.get("gpu")) != "cuda":
        attach_gpu_results(results, Path(args.gpu_results))
    if not args.update:
        # the peak again at the end: a peak measured while the machine was busy would flatter every ratio to it
        cases["matmul_end"] = run("matmul")
    save()


def classifier_variants() -> dict:
    """The classifier's runs: fp32 (query/value and all-linear), and bf16 where this CPU computes it fast."""
    from lorafit.cpu import cpu_has_bf16

    return {**CLASSIFIER_VARIANTS, **(CLASSIFIER_BF16_VARIANTS if cpu_has_bf16() else {})}


def earlier_results(out_dir: Path, meta: dict) -> dict:
    """OUT/results.json with this run noted among its updates: ``--update`` replaces only the cases it runs."""
    path = out_dir / "results.json"
    if not path.is_file():
        raise SystemExit(f"--update needs an earlier {path}; run the suite without --update first")
    results = json.loads(path.read_text(encoding="utf-8"))
    for derived in ("figures", "targets", "gflops"):  # recomputed from the cases on every write
        results.pop(derived, None)
    update = {k: meta[k] for k in ("command", "started", "cases", "load_average_start")}
    results["meta"].setdefault("updates", []).append({**update, "lorafit_commit": meta["versions"]["lorafit_commit"]})
    return results


def model_params(setup: Setup) -> dict:
    from bench.cpu_cases import matmul_params

    return {"classifier": matmul_params(setup.cls_model, "cls"), "llm": matmul_params(setup.llm_model, "causal")}


def _get_device(case: dict | None) -> str | None:
    return case.get("device") if isinstance(case, dict) else None


def attach_gpu_results(results: dict, path: Path) -> None:
    """Show the GPU figures of a run on a CUDA machine (this one has none) beside this run's own."""
    if not path.is_file():
        return
    other = json.loads(path.read_text(encoding="utf-8"))
    gpu = other.get("cases", {}).get("gpu")
    if _get_device(gpu) == "cuda":
        results["gpu_elsewhere"] = {"file": path.name, "meta": other["meta"], "gpu": gpu}


def gpu_case(run: Runner, smoke: bool) -> dict:
    import torch

    if torch.cuda.is_available():
        return run("gpu", {"device": "cuda"})
    if smoke:  # no GPU here: still run the GPU suite's code, on tiny configs on the CPU
        return {**run("gpu", {"device": "cpu"}), "note": "no CUDA device: GPU code path run on CPU with tiny configs"}
    return {"skipped": "no CUDA device on this machine (the smoke suite runs the GPU code path on the CPU)"}


if __name__ == "__main__":
    sys.exit(main())
