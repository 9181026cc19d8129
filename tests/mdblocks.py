"""The code blocks of the Markdown docs (README.md and docs/), as tests/test_docs.py runs them.

A fenced block is ```python, ```bash (or ```sh), or anything else (output, file listings,
flagfiles: never run). A block is checked for syntax only when the line before it (blank lines
between allowed) is the marker

    <!-- not-run: REASON -->

REASON says why it cannot run here (network weights, several machines, your own files).
Python blocks of one page run in order in one namespace; shell blocks are run command by
command: each `python -m tlloop.*` command (after a `&&`, too) with `TINY_FLAGS` appended, the
other commands (pip, pytest, tensorboard, export) only checked by `bash -n`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!-- not-run: (.+?) -->$")
# Flags appended to each entry point's command so that it runs in seconds (absl: the last wins).
TINY_FLAGS = {
    "tlloop.run": ["--head_epochs=1", "--finetune_epochs=1", "--quiet"],
    "tlloop.lr_find": ["--find_steps=5"],
}


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: its language, text, first line (1-based) in `path`, and the
    reason it is not run ("" when it runs)."""

    path: str
    language: str
    code: str
    line: int
    not_run: str = ""

    @property
    def where(self) -> str:
        return f"{os.path.relpath(self.path, REPO)}:{self.line}"


def pages() -> list[str]:
    """README.md, then every Markdown page under docs/ (in sorted order)."""
    found = [os.path.join(REPO, "README.md")]
    for folder, _, names in sorted(os.walk(os.path.join(REPO, "docs"))):
        found += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".md")]
    return found


def blocks(path: str) -> list[Block]:
    """Every fenced block of the Markdown file `path`, in order."""
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    found, index = [], 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = _NOT_RUN.match(lines[before].strip()) if before >= 0 else None
        found.append(
            Block(
                path,
                fence.group(1).lower(),
                "\n".join(lines[index + 1 : end]) + "\n",
                index + 2,
                marker.group(1) if marker else "",
            )
        )
        index = end + 1
    return found


def python_blocks(path: str) -> list[Block]:
    return [b for b in blocks(path) if b.language == "python"]


def shell_blocks(path: str) -> list[Block]:
    return [b for b in blocks(path) if b.language in ("bash", "sh", "shell")]


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, `&&` split."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split("&&")]
    return commands


def tlloop_command(command: str) -> list[str] | None:
    """The argv to run for a `python -m tlloop.ENTRY ...` command, tiny flags appended before
    any `--` or positional file arguments; None for any other command."""
    argv = shlex.split(command)
    if len(argv) < 3 or argv[:2] != ["python", "-m"] or not argv[2].startswith("tlloop."):
        return None
    entry, rest = argv[2], argv[3:]
    flags = [a for a in rest if a.startswith("--")]
    others = [a for a in rest if not a.startswith("--")]
    return ["python", "-m", entry, *flags, *TINY_FLAGS.get(entry, []), *others]
