"""The documentation runs: README.md and docs/*.md are checked as code.

- Every ```python block of a markdown file is executed, in order, in one namespace per file, from
  the repository root, so a snippet that uses a name it never defined, a facade name that is gone or
  a shipped file that moved fails here. The snippets use the shipped organisms at small sizes
  (8 problems, n=4, 24 new tokens), so each file takes seconds. A snippet that cannot run on its own
  (a user's model, a long run) is written as ```bash or ```text.
- README.md stays a front page (at most `README_MAX_LINES` lines); the rest lives in docs/.
- Every relative link points to a file or folder inside the repository, and every repository path
  (`probe/models/pair.py`) or dotted name (`probe.metrics.outcomes.Outcomes`) written in backticks
  exists (docs/architecture.md has its own, stricter check: tests/test_architecture_doc.py).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 150
MARKDOWN = [README, *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
# Tags a reader may see; a block tagged `py` or `python3` would otherwise be skipped silently.
FENCE_TAGS = ("python", "bash", "text", "json", "")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
CODE_PATH = re.compile(r"^(?:forksight|probe|steering|experiments|bench|notebooks|tests)/[\w./-]*$")
DOTTED = re.compile(r"^(?:forksight|probe|steering|experiments)(?:\.\w+)+$")
ANNOUNCED = {"experiments/results/real/"}  # named as where a result will ship (docs/real-pair.md)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(tag, line of the first code line, code) of every fenced block, in order."""
    text = path.read_text()
    return [(m.group(1).strip(), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for tag, line, code in fenced_blocks(path) if tag == "python"]


def links(path: Path) -> list[str]:
    """Link targets outside code (fenced blocks and inline code spans are not links)."""
    prose = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    return LINK.findall(prose)


WITH_PYTHON = [p for p in MARKDOWN if python_blocks(p)]


@pytest.fixture(scope="session")
def facade():
    """`import forksight` once (torch, transformers, sae-lens: seconds), so each file's time is its own."""
    import forksight

    return forksight


@pytest.mark.parametrize("md", WITH_PYTHON, ids=_rel)
def test_python_blocks_run(md, facade, monkeypatch, capsys):
    """The file's python blocks, in order, in one namespace, from the repository root."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace: dict = {"__name__": f"docs:{_rel(md)}"}
    for line, code in python_blocks(md):
        # Padded with newlines so a traceback names the markdown file and its own line numbers.
        compiled = compile("\n" * (line - 1) + code, str(md), "exec")
        try:
            exec(compiled, namespace)
        except Exception as e:
            raise AssertionError(f"{_rel(md)}: the ```python block at line {line} raised {e!r}; fix the snippet "
                                 "or the code it documents (a snippet that cannot run alone is ```bash / ```text)") from e
    capsys.readouterr()  # the snippets print their results for the reader; nothing to check in them here


def test_fenced_blocks_are_tagged():
    bad = [f"{_rel(p)}:{line} ```{tag}" for p in MARKDOWN for tag, line, _ in fenced_blocks(p) if tag not in FENCE_TAGS]
    assert not bad, (f"fenced blocks with tags outside {FENCE_TAGS} (a Python snippet must be ```python to be run "
                     "by this test):\n" + "\n".join(bad))


def test_readme_is_a_front_page():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, over {README_MAX_LINES}: move the detail into a "
                                       "docs/ page and link it")
    blocks = python_blocks(README)
    assert len(blocks) == 1, f"README.md has {len(blocks)} python examples; it keeps one (the rest go to docs/)"
    assert "import forksight as fs" in blocks[0][1], "the README's example uses the public facade"


def test_docs_are_linked_from_the_readme():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README)}
    orphans = [_rel(p) for p in MARKDOWN[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


@pytest.mark.parametrize("md", MARKDOWN, ids=_rel)
def test_relative_links_resolve(md):
    broken = []
    for target in links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = (md.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository)")
        elif not path.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{_rel(md)}: broken relative links: {broken}"


def _resolves(dotted: str) -> bool:
    """A module, or an object reached by attributes from the longest importable module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        if not Path(obj.__file__ or "").resolve().is_relative_to(REPO):
            return False  # another checkout's stale module (an editable install elsewhere on the path)
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("md", [p for p in MARKDOWN if p.name != "architecture.md"], ids=_rel)
def test_code_names_exist(md, monkeypatch):
    monkeypatch.chdir(REPO)
    words = {w.strip().rstrip(":") for span in re.findall(r"`([^`\n]+)`", md.read_text())
             for w in re.split(r"[\s,()=]+", span)}
    missing = sorted(w for w in words if CODE_PATH.match(w) and w not in ANNOUNCED and not (REPO / w).exists())
    missing += sorted(w for w in words if DOTTED.match(w) and not _resolves(w))
    assert not missing, f"{_rel(md)} names code that does not exist (moved or renamed?): {missing}"
