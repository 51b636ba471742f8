"""The README's examples run as written, and every relative link of the documentation resolves
(files, and `#anchors` into Markdown files)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _python_blocks():
    return CODE_BLOCK.findall(README.read_text())


def test_the_readme_has_its_three_examples():
    blocks = _python_blocks()
    assert len(blocks) == 3
    assert "ak.region_pool(" in blocks[0]
    assert "ak.PromptTokenInteraction(" in blocks[1] and "ak.LowRankPromptBank(" in blocks[1]
    assert "ak.inject_pim(" in blocks[2]


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    # Under the Triton interpreter on a CPU (tests/conftest.py), the default backend runs the
    # real kernels; the examples' shapes are small for that reason.
    monkeypatch.chdir(tmp_path)  # an example may write a file (pim.safetensors)
    exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), {})


def _markdown_files():
    files = [README, REPO / "configs" / "README.md", REPO / "avpt" / "PARAMS.md"]
    files += sorted((REPO / "docs").rglob("*.md"))
    files += sorted((REPO / "benchmarks" / "results").glob("README.md"))
    return [f for f in files if f.exists()]


def _anchors(markdown: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("markdown", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(markdown):
    text = re.sub(r"^```.*?^```", "", markdown.read_text(), flags=re.S | re.M)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (markdown.parent / path).resolve() if path else markdown
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
    assert not broken, f"{markdown.relative_to(REPO)}: " + "; ".join(broken)
