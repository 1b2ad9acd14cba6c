"""The layering rules of the package, checked on its source: only the CLI prints or parses arguments."""

import ast
from pathlib import Path

import dylora

SRC = Path(dylora.__file__).parent
CORE = ("functional", "layers", "config", "sampler", "model", "training", "resizing")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a source file imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {f".{node.module or alias.name}".split(".")[1] for alias in node.names}
    return names


def test_only_the_cli_imports_typer_or_rich():
    offenders = {p.name: sorted(imported_modules(p) & {"typer", "rich"}) for p in SRC.glob("*.py")
                 if p.name != "cli.py"}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_core_never_imports_the_outer_ring():
    # files (atomic writes) and cards (model cards beside saved adapters) are leaves the core may use
    outer = {p.stem for p in SRC.glob("*.py")} - set(CORE) - {"__init__", "__main__", "files", "cards"}
    for name in CORE:
        assert not imported_modules(SRC / f"{name}.py") & outer, name


def test_leaves_import_no_other_dylora_module_but_the_math():
    mods = {p.stem for p in SRC.glob("*.py")}
    assert imported_modules(SRC / "cards.py") & mods <= {"files", "functional"}
    assert imported_modules(SRC / "files.py") & mods == set()


def test_task_plugins_import_neither_each_other_nor_the_skeleton():
    for task, other in (("classification", "generation"), ("generation", "classification")):
        assert not imported_modules(SRC / f"{task}.py") & {other, "run", "cli"}, task
