"""Every relative link and anchor in the repository's Markdown resolves.

Documents point into each other by section; a renamed heading or a moved file would
otherwise break those pointers silently. Anchors follow GitHub's rule for heading ids
(lower case, punctuation dropped, spaces to hyphens, `-1`, `-2` for repeats).
"""
import os
import re
import subprocess
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the target stops at whitespace or the closing paren.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def markdown_files() -> List[str]:
  """The Markdown files git tracks or would track (ignored build outputs excluded)."""
  listed = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
      cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
  return sorted(path for path in listed if os.path.exists(os.path.join(REPO, path)))


def prose_lines(text: str) -> Iterator[Tuple[int, str]]:
  """(line number, line) outside fenced code blocks, inline code removed."""
  fenced = False
  for number, line in enumerate(text.splitlines(), start=1):
    if _FENCE.match(line):
      fenced = not fenced
      continue
    if not fenced:
      yield number, _INLINE_CODE.sub("", line)


def heading_slug(title: str) -> str:
  """GitHub's id for a heading: `What \\`make demo\\` prints` -> `what-make-demo-prints`."""
  title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading keeps its text
  title = title.strip().lower()
  title = re.sub(r"[^\w\- ]", "", title)
  return title.replace(" ", "-")


def anchors_of(text: str) -> Set[str]:
  anchors: Set[str] = set()
  seen: Dict[str, int] = {}
  fenced = False
  for line in text.splitlines():
    if _FENCE.match(line):
      fenced = not fenced
      continue
    heading = None if fenced else _HEADING.match(line)
    if heading:
      slug = heading_slug(heading.group(2))
      count = seen.get(slug, 0)
      seen[slug] = count + 1
      anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def broken_links(path: str) -> List[str]:
  """`file:line: target (why)` for each relative link of `path` that does not resolve."""
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    text = f.read()
  problems = []
  for number, line in prose_lines(text):
    for target in _LINK.findall(line):
      if _EXTERNAL.match(target):
        continue
      file_part, _, anchor = target.partition("#")
      if file_part:
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        if resolved.startswith(".."):
          problems.append(f"{path}:{number}: {target} (leaves the repository)")
          continue
        full = os.path.join(REPO, resolved)
        if not os.path.exists(full):
          problems.append(f"{path}:{number}: {target} (no such file)")
          continue
      else:
        full = os.path.join(REPO, path)
      if anchor:
        if not full.endswith(".md"):
          problems.append(f"{path}:{number}: {target} (an anchor into a file that is not Markdown)")
          continue
        with open(full, encoding="utf-8") as f:
          if anchor not in anchors_of(f.read()):
            problems.append(f"{path}:{number}: {target} (no heading with that anchor)")
  return problems


def test_the_slug_rule_matches_github():
  assert heading_slug("What `make demo` prints") == "what-make-demo-prints"
  assert heading_slug("Set up: two commands") == "set-up-two-commands"
  assert heading_slug("The demo (`make demo`)") == "the-demo-make-demo"
  assert heading_slug("Model, training and checkpoints") == "model-training-and-checkpoints"
  assert anchors_of("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_checker_finds_a_broken_link_and_a_missing_anchor(tmp_path, monkeypatch):
  """The checker itself must fail on what it is there to catch."""
  monkeypatch.setattr(__import__(__name__), "REPO", str(tmp_path))
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Real section\n", encoding="utf-8")
  (tmp_path / "README.md").write_text(
      "[ok](docs/a.md#real-section) [gone](docs/b.md) [moved](docs/a.md#old-section)\n"
      "`[in code](nowhere.md)` [self](#readme-top) [web](https://example.com/x)\n"
      "```\n[fenced](nowhere.md)\n```\n# README top\n", encoding="utf-8")
  problems = broken_links("README.md")
  assert problems == ["README.md:1: docs/b.md (no such file)",
                      "README.md:1: docs/a.md#old-section (no heading with that anchor)"]


@pytest.mark.parametrize("path", markdown_files())
def test_every_relative_link_and_anchor_resolves(path):
  assert broken_links(path) == []


_SECTION_BY_TITLE = re.compile(r"README(?:\.md)?,\s*[\"'“]")


def test_no_file_points_into_a_document_by_a_quoted_section_title():
  """`(README, "Benchmarks")` breaks silently when the heading changes; use a link."""
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
  offenders = []
  for path in listed:
    if not path.endswith((".py", ".md", ".gin", ".sh", ".toml", ".cfg")):
      continue
    full = os.path.join(REPO, path)
    if not os.path.exists(full) or path == "tests/test_markdown_links.py":
      continue
    with open(full, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if _SECTION_BY_TITLE.search(line):
          offenders.append(f"{path}:{number}: {line.strip()}")
  assert offenders == []
