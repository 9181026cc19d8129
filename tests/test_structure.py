"""The house's rules, read from the code's imports and strings (nothing of tlloop is run).

- no import circle between tlloop's modules (imports inside functions count);
- no library module imports the command line's config sections;
- no `--flag` text outside tlloop/cli/ and the entry points (modules run as `python -m`);
- no private name (`_x`) imported from another module.

Re-run any time: `python -m pytest -q tests/test_structure.py`.
"""

from __future__ import annotations

import ast
import os
import re

import pytest
from conftest import REPO

PACKAGE = os.path.join(REPO, "tlloop")
# The command line's own config sections: the library takes explicit arguments instead.
CLI_SECTIONS = {
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "TaskConfig",
    "DistributeConfig",
    "TwoPhases",
}
FLAG_TEXT = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")


def _modules() -> dict[str, ast.Module]:
    """Every tlloop module by dotted name, parsed."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                dotted = dotted.removesuffix(".__init__")
                with open(path, encoding="utf-8") as file:
                    found[dotted] = ast.parse(file.read(), path)
    return found


MODULES = _modules()


def _package_of(module: str) -> str:
    is_package = os.path.exists(os.path.join(REPO, *module.split("."), "__init__.py"))
    return module if is_package else module.rpartition(".")[0]


def imports(modules: dict[str, ast.Module], module: str) -> list[tuple[str, str | None]]:
    """(imported tlloop module, name taken from it or None) for every import in `module`."""
    found = []
    for node in ast.walk(modules[module]):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package_of(module).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                # `from tlloop import actions` imports a module; `from tlloop.x import y` a name.
                found.append((child, None) if child in modules else (base, alias.name))
    return [(target, name) for target, name in found if target in modules]


def is_cli(modules: dict[str, ast.Module], module: str) -> bool:
    """Whether `module` is the command line's: under tlloop/cli/, or run as `python -m`."""
    if module == "tlloop.cli" or module.startswith("tlloop.cli."):
        return True
    return any(
        isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
        for node in modules[module].body
    )


def circles(modules: dict[str, ast.Module]) -> list[list[str]]:
    """Every set of modules importing each other round (Tarjan's strongly connected
    components of more than one module). A package importing its own modules is no circle."""
    edges = {
        module: sorted(
            {t for t, _ in imports(modules, module) if t != module and t != _package_of(module)}
        )
        for module in modules
    }
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def cli_sections_in_library(modules: dict[str, ast.Module]) -> list[str]:
    """Library modules importing a config section only the command line has."""
    return [
        f"{module} imports {name}"
        for module in sorted(modules)
        if not is_cli(modules, module)
        for _, name in imports(modules, module)
        if name in CLI_SECTIONS
    ]


def _strings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of every string constant that is not a docstring."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def flag_text_in_library(modules: dict[str, ast.Module]) -> list[str]:
    """Strings (docstrings aside) in library modules that spell a `--flag`."""
    return [
        f"{module}:{line}: {text!r}"
        for module in sorted(modules)
        if not is_cli(modules, module)
        for line, text in _strings(modules[module])
        if FLAG_TEXT.search(text)
    ]


def private_imports(modules: dict[str, ast.Module]) -> list[str]:
    """`from tlloop.x import _y`: a private name taken from another module."""
    return [
        f"{module} imports {target}.{name}"
        for module in sorted(modules)
        for target, name in imports(modules, module)
        if name and name.startswith("_") and not name.startswith("__")
    ]


RULES = [circles, cli_sections_in_library, flag_text_in_library, private_imports]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_house_keeps_the_rule(rule):
    assert rule(MODULES) == []


# Two made-up modules added to the real ones, each breaking one rule.
BROKEN = {
    circles: {"tlloop.zz_a": "from tlloop import zz_b", "tlloop.zz_b": "import tlloop.zz_a"},
    cli_sections_in_library: {
        "tlloop.zz_a": "from tlloop.zz_b import RunConfig",
        "tlloop.zz_b": "RunConfig = None",
    },
    flag_text_in_library: {"tlloop.zz_a": "def f():\n    raise ValueError('--lr: bad')"},
    private_imports: {"tlloop.zz_a": "from tlloop.zz_b import _hidden", "tlloop.zz_b": ""},
}


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_each_rule_sees_what_it_forbids(rule):
    extra = {name: ast.parse(text) for name, text in BROKEN[rule].items()}
    assert rule({**MODULES, **extra}) != []


def test_a_keras_file_saved_before_the_split_loads_and_computes_the_same():
    """Modules moved, registration names did not: a model.keras written by tlloop before the
    library/command-line split (every registered model class in it) loads and gives the same
    outputs (tests/data/keras_before/make.py made both files)."""
    import keras
    import numpy as np

    import tlloop  # registers tlloop's Keras classes

    here = os.path.join(REPO, "tests", "data", "keras_before")
    model = keras.saving.load_model(os.path.join(here, "model.keras"))
    assert isinstance(model, tlloop.TransferModel)
    expected = np.load(os.path.join(here, "expected.npz"))
    outputs = np.asarray(model(expected["inputs"], training=False))
    np.testing.assert_allclose(outputs, expected["outputs"], rtol=1e-5, atol=1e-5)
