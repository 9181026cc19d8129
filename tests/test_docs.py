"""The docs (README.md and docs/): every example runs, every generated table is the result
file's, every number on a measured page is in the result files it names, the site builds.

The code blocks run in one shared directory (the repo's experiments/ and examples/ linked in,
two image files for `tlloop.predict`), the README's first, then the pages in sorted order: the
quickstart run the README's first command makes is the run the later pages evaluate and load.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess

import mdblocks
import numpy as np
import pytest
from conftest import REPO, python_command

_spec = importlib.util.spec_from_file_location("docs_hooks", os.path.join(REPO, "docs", "hooks.py"))
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)

PAGES = mdblocks.pages()
_NUMBERS_FROM = re.compile(r"^<!-- numbers-from: (.+?) -->$", re.MULTILINE)
_NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)")


def _name(path: str) -> str:
    return os.path.relpath(path, REPO)


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    """The directory every block runs in, as a user's checkout would look to them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("docs")
    for name in ("experiments", "examples"):
        os.symlink(os.path.join(REPO, name), root / name)
    digits = np.load(os.path.join(REPO, "tlloop", "data", "digits.npz"))
    for name, index in (("a.png", 5), ("b.jpg", 6)):
        grey = (digits["images"][index] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(grey).convert("RGB").resize((32, 32)).save(root / name)
    return root


def _shell_pages() -> list[str]:
    return [p for p in PAGES if mdblocks.shell_blocks(p)]


@pytest.mark.parametrize("page", _shell_pages(), ids=_name)
def test_shell_blocks_parse_and_their_tlloop_commands_run_tiny(page, docs_dir):
    for block in mdblocks.shell_blocks(page):
        parsed = subprocess.run(["bash", "-n"], input=block.code, text=True, capture_output=True)
        assert parsed.returncode == 0, f"{block.where}: {parsed.stderr}"
        if block.not_run:
            continue
        for command in mdblocks.shell_commands(block):
            argv = mdblocks.tlloop_command(command)
            if argv is None and command.startswith("python examples/"):
                argv = command.split()
            if argv is None:  # pip, pytest, tensorboard: not tlloop's to run here
                continue
            run = {**python_command(*argv[1:]), "cwd": docs_dir}
            done = subprocess.run(**run, capture_output=True, timeout=300)
            assert done.returncode == 0, f"{block.where}: {command}\n{done.stderr[-3000:]}"


def _python_pages() -> list[str]:
    return [p for p in PAGES if mdblocks.python_blocks(p)]


@pytest.mark.parametrize("page", _python_pages(), ids=_name)
def test_python_blocks_run_in_order(page, docs_dir, monkeypatch):
    monkeypatch.chdir(docs_dir)
    if not os.path.exists(docs_dir / "runs" / "quickstart" / "export"):  # run alone (-k)
        argv = mdblocks.tlloop_command(
            "python -m tlloop.run --flagfile=experiments/quickstart.flags"
        )
        done = subprocess.run(**{**python_command(*argv[1:]), "cwd": docs_dir}, timeout=300)
        assert done.returncode == 0
    namespace = {"__name__": "__docs__"}
    for block in mdblocks.python_blocks(page):
        code = compile(block.code, block.where, "exec")
        if not block.not_run:
            exec(code, namespace)


def test_every_block_not_run_says_why_and_most_run():
    blocks = [b for p in PAGES for b in mdblocks.blocks(p) if b.language in ("python", "bash")]
    not_run = [b for b in blocks if b.not_run]
    assert all(len(b.not_run) > 10 for b in not_run)
    assert len(not_run) < len(blocks) / 2, [b.where for b in not_run]


def test_readme_is_a_front_page_whose_flagfile_is_the_quickstart():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    assert len(readme.splitlines()) <= 150
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    quickstart = "python -m tlloop.run --flagfile=experiments/quickstart.flags"
    assert commands == [
        f"python -m pip install -e . && {quickstart}",
        'python -m pip install -e ".[test]" && python -m pytest -q',
    ]
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):  # relative links resolve
        assert os.path.exists(os.path.join(REPO, target)), target
    shown = readme.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    with open(os.path.join(REPO, "experiments", "quickstart.flags"), encoding="utf-8") as file:
        flags = [line.strip() for line in file if line.startswith("--")]
    assert shown == flags


def _generated(page: str) -> list[tuple[str, list[str]]]:
    with open(page, encoding="utf-8") as file:
        return [(m.group(1), m.group(2).split()) for m in hooks.MARKER.finditer(file.read())]


def test_generated_tables_are_the_result_files():
    tables = [(p, a) for p in PAGES for kind, a in _generated(p) if kind == "table"]
    assert len(tables) >= 5
    for page, (path, number) in tables:
        with open(page, encoding="utf-8") as file:
            rendered = hooks.render(file.read())
        with open(os.path.join(REPO, path), encoding="utf-8") as file:
            lines = [line for line in file.read().splitlines() if line.startswith("|")]
        table = hooks.result_table(path, int(number)).splitlines()
        assert all(line in lines for line in table), (page, path)
        assert "\n".join(table) in rendered, (page, path)
    # An experiment's rows are its JSON's numbers, run by run.
    rows = hooks.experiments_table(["quickstart"]).splitlines()[2:]
    assert [row.split(" | ")[4:6] for row in rows] == [
        ["0.732", "0.71"],
        ["0.703", "0.825"],
        ["0.743", "0.777"],
    ]


def _prose(text: str) -> str:
    """Markdown text outside code blocks, inline code and version numbers."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"(TensorFlow|Keras|TF) \d+\.\d+", "", " ".join(text.split()))  # versions
    # Differences in points ("lost 4.3, 1.6 and 0.3 points") are computed from the numbers.
    # and so are signed ones ("+2.5 for LP-FT", "(+0.6, -0.5)").
    text = re.sub(r"(?:\d+(?:\.\d+)?(?:,| and| to)? )+points?\b", "", text)
    text = re.sub(r"(?<=[\s(])[+-]\d+\.\d+", "", text)
    return re.sub(r"`[^`]*`", "", text)


def _measured_pages() -> list[str]:
    return [p for p in PAGES if _NUMBERS_FROM.search(open(p, encoding="utf-8").read())]


@pytest.mark.parametrize("page", _measured_pages(), ids=_name)
def test_every_number_in_a_measured_part_is_in_a_result_file_it_names(page):
    # A measured part runs from its `<!-- numbers-from: FILES -->` marker to
    # `<!-- numbers-end -->` (or the page's end); FILES (or folders) are committed results.
    with open(page, encoding="utf-8") as file:
        text = file.read()
    for match in _NUMBERS_FROM.finditer(text):
        part = text[match.end() :].split("<!-- numbers-end -->", 1)[0]
        found = set()
        for source in match.group(1).split():
            path = os.path.join(REPO, source)
            paths = [path]
            if os.path.isdir(path):
                paths = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
            for each in paths:
                with open(each, encoding="utf-8") as file:
                    numbers = re.findall(r"\d+\.\d+", file.read().replace(",", ""))
                found |= {float(n) for n in numbers}
        numbers = _NUMBER.findall(_prose(part).replace(",", ""))
        missing = [n for n in numbers if float(n) not in found]
        assert not missing, f"{_name(page)}: not in {match.group(1)}: {missing}"


def test_flags_reference_lists_every_flag_under_its_owner():
    page = hooks.flags_markdown()
    options = hooks.flag_options()  # the docs' one import of the options
    assert len(options) > 80
    for meta in options:
        owner = meta.owner.rpartition(".")[2]
        section = page.split(f"## {owner}\n", 1)[1].split("\n## ", 1)[0]
        assert f"`--helpfull` lists these under `{meta.owner}`" in section
        assert f"| `--{meta.flag}` |" in section, meta.flag


def test_api_reference_names_every_public_name():
    import tlloop

    page = hooks.api_markdown()
    for name, (module, attribute) in tlloop._PUBLIC.items():
        assert f"## tlloop.{name}\n" in page and f"::: {module}.{attribute}\n" in page
