"""MkDocs hook: the parts of the docs generated from the code and the committed results.

A page asks for generated text with a marker on a line of its own; the hook puts the text right
after the marker, at build time, so nothing generated is typed by hand:

    <!-- generated: flags -->                         every command-line flag, grouped by owner
    <!-- generated: api -->                           the Python API reference (mkdocstrings)
    <!-- generated: table benchmarks/results/X.md N --> the N-th table (from 1) of a result file
    <!-- generated: experiments NAME ... -->          EXPERIMENTS-NAME.json's runs, one per row

`render(markdown)` is what the build does to a page; tests/test_docs.py checks the pages with it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("benchmarks", "results")
MARKER = re.compile(r"^<!-- generated: (\w+)(.*?) -->$", re.MULTILINE)


def flag_options() -> tuple[Any, ...]:
    """Every option of the run's config (tlloop's `options()`), each naming its owner."""
    # The one import of the flags' definitions: every option field of the run's config (and
    # each names the dataclass `--helpfull` groups it under).
    from tlloop.cli.config import options

    return options()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flag_default(value: Any) -> str:
    """A flag's default as it is typed on the command line."""
    if value is None:
        return "(required)"
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"`{value}`" if value != "" else "(empty)"


def flags_markdown() -> str:
    """Every `python -m tlloop.run` flag, from the config's option fields, one table per owner
    dataclass in flags.txt order (as `--helpfull` groups them under `MODULE.OWNER`)."""
    from tlloop.cli.flags import help_text

    options = flag_options()
    groups: dict[str, list[Any]] = {}
    for meta in options:
        groups.setdefault(meta.owner, []).append(meta)
    out = []
    for owner, metas in groups.items():
        out += [
            f"## {owner.rpartition('.')[2]}",
            "",
            f"`--helpfull` lists these under `{owner}`.",
            "",
        ]
        out += ["| flag | type | default | meaning |", "|---|---|---|---|"]
        for meta in metas:
            kind = meta.kind + (": " + ", ".join(meta.choices) if meta.choices else "")
            default = _flag_default(meta.default)
            out.append(
                f"| `--{meta.flag}` | {_cell(kind)} | {_cell(default)} | {_cell(help_text(meta))} |"
            )
        out.append("")
    return "\n".join(out)


def api_markdown() -> str:
    """The reference of every public name of `import tlloop`, from the docstrings of the
    objects `tlloop._PUBLIC` maps them to (so it follows the code when a module moves)."""
    import tlloop

    out = []
    for name in sorted(tlloop._PUBLIC, key=str.lower):
        module, attribute = tlloop._PUBLIC[name]
        alias = "" if attribute == name else f" (defined as `{module}.{attribute}`)"
        out += [f"## tlloop.{name}", "", f"`tlloop.{name}`{alias}", ""]
        out += [f"::: {module}.{attribute}", "    options:", "      show_root_heading: false", ""]
    return "\n".join(out)


def result_table(path: str, number: int) -> str:
    """The `number`-th Markdown table (from 1) of the committed result file `path`."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as file:
        text = file.read()
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            tables.append("\n".join(current))
            current = []
    if not 1 <= number <= len(tables):
        raise ValueError(f"{path}: has {len(tables)} tables, not a table {number}")
    return tables[number - 1] + "\n"


def experiments_table(names: list[str]) -> str:
    """One row per run of each experiment's EXPERIMENTS-NAME.json (what `python -m
    benchmarks.experiments` measured): its variant, seed, metric after each phase, best."""
    rows = [
        "| experiment | run | seed | metric | after the head phase | at the end | best |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        path = os.path.join(ROOT, RESULTS, f"EXPERIMENTS-{name}.json")
        with open(path, encoding="utf-8") as file:
            result = json.load(file)
        for variant, runs in result["runs"].items():
            for run in runs:
                cells = [run.get(key, "") for key in ("head", "finetune", "best")]
                rows.append(
                    f"| `{name}.flags` | {_cell(variant)} | {run['seed']} | "
                    f"{run.get('metric', 'accuracy')} | " + " | ".join(map(str, cells)) + " |"
                )
    return "\n".join(rows) + "\n"


def generate(kind: str, arguments: list[str]) -> str:
    """The text one marker stands for."""
    if kind == "flags":
        return flags_markdown()
    if kind == "api":
        return api_markdown()
    if kind == "table":
        return result_table(arguments[0], int(arguments[1]))
    if kind == "experiments":
        return experiments_table(arguments)
    raise ValueError(f"unknown generated section {kind!r}")


def render(markdown: str) -> str:
    """`markdown` with each marker followed by the text it stands for."""

    def expand(match: re.Match) -> str:
        return match.group(0) + "\n\n" + generate(match.group(1), match.group(2).split())

    return MARKER.sub(expand, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs event: every page goes through `render`."""
    return render(markdown)
