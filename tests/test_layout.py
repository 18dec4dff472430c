"""The import rules of docs/ARCHITECTURE.md, read from the source: stages are siblings, the core knows no stage.

- nothing in `gitseg/` outside its CLI layer imports `search` or `ensemble`;
- `search` never imports `ensemble`; `ensemble` imports `search` in one module only, the student
  runs of distillation (`ensemble/distill/students.py`), which are the refit's own Ray Train runs;
- neither imports `gitseg.cli`, except through its `__main__.py` entry point (CLI layer);
- an import inside a function outside the CLI layer is of a heavy or optional third-party
  library, with its reason in a comment; one internal module is imported so, the PyTorch engine
  (`ensemble.model`) inside `ensemble/deploy/runtime.py`'s `load_engine`, so that the ONNX Runtime
  path imports no PyTorch (tests/test_onnx.py checks that it does not).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gitseg", "search", "ensemble")
# The one module of a stage that may import the other stage (see the module docstring).
STAGE_BRIDGE = {"ensemble/distill/students.py": "search"}
# The one internal module imported inside a function (see the module docstring).
LAZY_ENGINE = {"ensemble/deploy/runtime.py": "ensemble.model"}


def in_cli_layer(name: str) -> bool:
    """The CLI layer knows the stages: each stage's entry points (`cli.py`, `__main__.py`) and the
    demo that chains them all."""
    return name.rsplit("/", 1)[-1] in ("cli.py", "__main__.py") or name == "gitseg/demo.py"


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) for every import in a file, nested ones included."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, node.lineno, id(node) in nested))
    return found


def sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def broken_rules(name: str, path: Path) -> list[str]:
    package = name.split("/")[0]
    problems = []
    for module, line, _ in imports(path):
        where = f"{name}:{line} imports {module}"
        if in_cli_layer(name):
            continue
        if package == "gitseg" and (within(module, "search") or within(module, "ensemble")):
            problems.append(f"{where}: the core imports no stage")
        if package in ("search", "ensemble"):
            other = "ensemble" if package == "search" else "search"
            if within(module, other) and STAGE_BRIDGE.get(name) != other:
                problems.append(f"{where}: stages are siblings")
            if within(module, "gitseg.cli"):
                problems.append(f"{where}: a stage never imports the CLI")
    return problems


def test_import_rules_hold():
    problems = [p for name, path in sources() for p in broken_rules(name, path)]
    assert not problems, "\n".join(problems)


def test_the_rules_see_imports_inside_functions(tmp_path):
    # An entry point imports its stage lazily; were it a core module, the rule would have to catch it.
    assert ("search.run", True) in {(m, lazy) for m, _, lazy in imports(ROOT / "search" / "cli.py")}
    core = tmp_path / "core.py"
    core.write_text("def f():\n    from ensemble.selection.build import build_ensemble\n")
    expected = "gitseg/core.py:2 imports ensemble.selection.build: the core imports no stage"
    assert broken_rules("gitseg/core.py", core) == [expected]
    stage = tmp_path / "stage.py"
    stage.write_text("import gitseg.cli\nfrom search import run\n")
    assert len(broken_rules("ensemble/stage.py", stage)) == 2
    # The bridge may import search, and only search: not the CLI, and search may not import it back.
    assert len(broken_rules("ensemble/distill/students.py", stage)) == 1
    assert len(broken_rules("search/refit.py", stage)) == 1  # gitseg.cli; `from search import` is its own
    back = tmp_path / "back.py"
    back.write_text("from ensemble.distill.students import train_students\n")
    assert broken_rules("search/refit.py", back) == ["search/refit.py:1 imports ensemble.distill.students: "
                                                     "stages are siblings"]


def test_lazy_imports_are_heavy_third_party_libraries_with_a_reason():
    problems = []
    for name, path in sources():
        if in_cli_layer(name):
            continue
        lines = path.read_text().splitlines()
        previous = None
        for module, line, lazy in sorted(imports(path), key=lambda item: item[1]):
            if not lazy:
                continue
            if LAZY_ENGINE.get(name) == module and any("#" in text for text in lines[max(0, line - 3):line]):
                pass
            elif module.split(".")[0] in PACKAGES:
                problems.append(f"{name}:{line}: {module} is imported inside a function; import it at the top")
            # One reason covers a run of consecutive imports; it sits on the line or just above it.
            elif previous != line - 1 and not any("#" in text for text in lines[max(0, line - 3):line]):
                problems.append(f"{name}:{line}: say in a comment why {module} is imported lazily")
            previous = line
    assert not problems, "\n".join(problems)
