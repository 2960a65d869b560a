"""Every reference resolves inside the repository: a reader has the repository, nothing beside it.

Scanned at test time, over every tracked text file (this file excepted: it spells the patterns), so a
file added later is held to the same rule:

- no citation of the development notes that live outside the repository (``SPEC.md``, ``STACK.md``,
  ``STYLE.md``, "SPEC step 7", ``../shared``): the algorithm is ``docs/algorithm.md``;
- every ``docs/...`` path names a file the repository holds, and every ``docs/<page>.md#anchor`` a
  heading of that page;
- every upper-case root document (``README.md``, ``CONTRIBUTING.md``, ...) named anywhere exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
OUTSIDE = re.compile(r"\bSPEC\b|\b(?:STACK|STYLE)\.md\b|\.\./shared\b")
DOCS_PATH = re.compile(r"(?<![\w/.-])(docs/[\w./-]*\w)(?:#([\w-]+))?")
ROOT_DOCUMENT = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")
SKIPPED_DIRS = {".git", ".venv", "venv", "runs", "build", "dist", "__pycache__"}


def tracked_text_files() -> list[Path]:
    """The repository's tracked files (``git ls-files``; outside a git checkout, every file not in a
    build, cache or virtual-environment folder) that decode as UTF-8 text."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        paths = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)
            and not p.relative_to(ROOT).parts[0].endswith(".egg-info")
        ]
    texts = []
    for path in paths:
        if not path.is_file() or path.resolve() == THIS:
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(path)
    return texts


def lines_matching(pattern: re.Pattern[str]) -> list[tuple[str, int, re.Match[str]]]:
    """``(relative path, line number, match)`` of every match in the tracked text files."""
    found = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            found += [(path.relative_to(ROOT).as_posix(), number, m) for m in pattern.finditer(line)]
    return found


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading's text: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def page_anchors(page: Path) -> set[str]:
    return {
        heading_anchor(line.lstrip("#"))
        for line in page.read_text(encoding="utf-8").splitlines()
        if re.match(r"#{1,6} ", line)
    }


def test_heading_anchor_hand_checked() -> None:
    assert (
        heading_anchor("Step 6: causal look-ahead (CL-EGRSD only)")
        == "step-6-causal-look-ahead-cl-egrsd-only"
    )
    assert heading_anchor(" Teacher update schedules") == "teacher-update-schedules"
    assert heading_anchor("`ema` and `hard_copy`") == "ema-and-hard_copy"


def test_the_scan_sees_the_repository() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in tracked_text_files()}
    assert {"docs/algorithm.md", "egrsd_pl/losses/token_weights.py", "pyproject.toml"} <= names
    assert "tests/test_references.py" not in names  # spells the patterns it forbids


def test_nothing_cites_notes_outside_the_repository() -> None:
    hits = [f"{path}:{number}: {match.group(0)}" for path, number, match in lines_matching(OUTSIDE)]
    assert hits == [], "cite docs/algorithm.md (or state the fact in place) instead of: " + "; ".join(hits)


def test_every_docs_path_and_anchor_resolves() -> None:
    missing = []
    for path, number, match in lines_matching(DOCS_PATH):
        target, anchor = ROOT / match.group(1), match.group(2)
        if not target.exists():
            missing.append(f"{path}:{number}: {match.group(1)} does not exist")
        elif anchor is not None and target.suffix == ".md" and anchor not in page_anchors(target):
            missing.append(f"{path}:{number}: {match.group(1)} has no heading #{anchor}")
    assert missing == [], "; ".join(missing)


def test_every_root_document_named_exists() -> None:
    missing = [
        f"{path}:{number}: {match.group(1)}"
        for path, number, match in lines_matching(ROOT_DOCUMENT)
        if not (ROOT / match.group(1)).is_file()
    ]
    assert missing == [], "; ".join(missing)
