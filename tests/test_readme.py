"""The README's layout section names every package and core module of src/lorafit, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_layout_matches_the_package_tree():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Layout\n.*?```\nsrc/lorafit/\n(.*?)```", readme, re.S)
    assert block, "README.md has no layout block starting with src/lorafit/"
    listed = {line.split()[0] for line in block[1].splitlines() if line.startswith("  ") and line.strip()}
    package = REPO / "src" / "lorafit"
    present = {p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    present |= {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert listed == present
