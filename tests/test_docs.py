"""Documentation that cannot rot: every Python and shell snippet of README.md and docs/ runs here,
and the site builds with ``mkdocs build --strict`` (no broken link or reference).

A snippet is a fenced block whose language is ``python``, ``bash`` or ``sh``. HTML comments right
above it (invisible on GitHub and on the site) say how it is tested:

* ``<!-- test: skip, needs a GPU -->`` or ``<!-- test: skip, needs the full data -->``: not run
  here; those are the only two reasons a snippet may give.
* ``<!-- test: replace "OLD" "NEW" -->``: run with OLD replaced by NEW (tiny settings, a temporary
  output folder); OLD must occur in the snippet, so the directive cannot outlive its text.
* ``<!-- test: fails -->``: the snippet must exit with a non-zero status (a refusal).
* ``<!-- test: output below -->``: every line of the ``text`` block that follows the snippet must
  appear, exactly, as a line of what the snippet printed (stdout and stderr): quoted messages are
  what the tools print.
* ``<!-- test: timeout N -->``: seconds (default 300).

Snippets run from the repository root with ``$DOCS_TMP`` set to a fresh temporary folder; shell
snippets under ``bash -e -o pipefail``.
"""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from conftest import REPO, subprocess_env

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash"}
SKIP_REASONS = ("needs a GPU", "needs the full data")
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test:\s*(.*?)\s*-->\s*$")


@dataclass
class Snippet:
    path: Path
    line: int
    language: str
    code: str
    directives: List[str] = field(default_factory=list)
    expected_output: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _blocks(path: Path):
    """(line, language, text, directives) of every fenced block, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i, pending = 0, []
    while i < len(lines):
        directive = _DIRECTIVE.match(lines[i])
        fence = _FENCE.match(lines[i])
        if directive:
            pending.append(directive.group(1))
        elif fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i][len(fence.group(1)):])
                i += 1
            yield start, fence.group(2), "\n".join(body) + "\n", pending
            pending = []
        elif lines[i].strip():
            pending = []
        i += 1


def snippets() -> List[Snippet]:
    found = []
    for path in DOC_FILES:
        blocks = list(_blocks(path))
        for k, (line, language, text, directives) in enumerate(blocks):
            if language not in LANGUAGES:
                continue
            snippet = Snippet(path, line, LANGUAGES[language], text, directives)
            if "output below" in directives:
                following = blocks[k + 1] if k + 1 < len(blocks) else None
                assert following and following[1] == "text", f"{snippet.id}: 'output below' needs a text block next"
                snippet.expected_output = following[2]
            found.append(snippet)
    return found


SNIPPETS = snippets()


def _prepared(snippet: Snippet, tmp: Path) -> tuple:
    code, timeout, fails, skip = snippet.code, 300, False, None
    for directive in snippet.directives:
        if directive.startswith("skip"):
            skip = directive.split(",", 1)[1].strip() if "," in directive else ""
        elif directive.startswith("replace"):
            old, new = shlex.split(directive)[1:3]
            assert old in code, f"{snippet.id}: 'replace' names text that is not in the snippet: {old!r}"
            code = code.replace(old, new)
        elif directive == "fails":
            fails = True
        elif directive.startswith("timeout"):
            timeout = int(directive.split()[1])
        elif directive != "output below":
            raise AssertionError(f"{snippet.id}: unknown test directive {directive!r}")
    return code, timeout, fails, skip


def test_every_snippet_is_found():
    assert len(SNIPPETS) >= 10  # the parser did not silently lose the docs' snippets
    assert any(s.path.name == "README.md" for s in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet, tmp_path):
    code, timeout, fails, skip = _prepared(snippet, tmp_path)
    if skip is not None:
        assert skip in SKIP_REASONS, f"{snippet.id}: a snippet may only be left out because it {' or '.join(SKIP_REASONS)}"
        return
    env = {**subprocess_env(), "DOCS_TMP": str(tmp_path)}
    if snippet.language == "python":
        script = tmp_path / "snippet.py"
        script.write_text(code, encoding="utf-8")
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", code]
    proc = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if fails:
        assert proc.returncode != 0, f"{snippet.id} was meant to fail:\n{output[-3000:]}"
    else:
        assert proc.returncode == 0, f"{snippet.id} failed ({proc.returncode}):\n{output[-4000:]}"
    if snippet.expected_output is not None:
        printed = {line.rstrip() for line in output.splitlines()}
        for line in snippet.expected_output.splitlines():
            if line.strip() and not line.lstrip().startswith("..."):
                assert line.rstrip() in printed, f"{snippet.id}: the docs quote a line the tool did not print: {line!r}\n{output[-3000:]}"


def test_site_builds_strict(tmp_path):
    """No broken link, anchor or API reference (mkdocs-material, mkdocstrings)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=str(REPO), env={**subprocess_env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert (tmp_path / "site" / "index.html").is_file()
