"""lorafit's benchmark suite: lorafit against PEFT + transformers' Trainer on the same machine.

Run ``python bench/run.py`` (full CPU suite) or ``python bench/run.py --smoke`` (tiny, seconds).
See bench/README.md.
"""
