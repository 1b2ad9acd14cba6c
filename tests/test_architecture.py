"""The layering rules of the package, checked on its source.

Two rings, two folders: the core is the modules directly in `src/dylora/` (what a PEFT user imports); the
application is `src/dylora/app/` (the CLI, settings, run skeleton, run directory, tasks, data and model sources,
checkpoints, reports). The core never imports the application, nor the application's dependencies; only the CLI
prints or parses arguments; tasks import neither each other nor the skeleton.
"""

import ast
import subprocess
import sys
from pathlib import Path

import dylora
import dylora.functional

SRC = Path(dylora.__file__).parent
CORE = sorted(p for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))
APP = sorted((SRC / "app").rglob("*.py"))
APP_DEPENDENCIES = {"typer", "rich", "matplotlib", "sklearn", "datasets", "rouge_score", "sacrebleu"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (at any depth of the file), relative imports resolved to dotted names."""
    package = module_name(path) if path.stem == "__init__" else module_name(path).rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            stem = ".".join([*base, node.module] if node.module else base)
            names.add(stem)
            names |= {f"{stem}.{alias.name}" for alias in node.names}
    return names


def tops(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_the_rings_are_folders():
    assert {p.stem for p in CORE} >= {"functional", "layers", "config", "model", "recipes", "training", "guard",
                                      "sweep"}
    assert {module_name(p) for p in APP} >= {"dylora.app.cli", "dylora.app.run", "dylora.app.settings",
                                             "dylora.app.rundir", "dylora.app.tasks",
                                             "dylora.app.tasks.classification", "dylora.app.tasks.generation"}


def test_the_core_never_imports_the_application_nor_its_dependencies():
    for path in CORE:
        imported = imported_modules(path)
        assert not {n for n in imported if n == "dylora.app" or n.startswith("dylora.app.")}, path.name
        assert not tops(imported) & APP_DEPENDENCIES, path.name


def test_only_the_cli_imports_typer_or_rich():
    offenders = {module_name(p): sorted(tops(imported_modules(p)) & {"typer", "rich"}) for p in CORE + APP
                 if p.name != "cli.py"}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_leaves_import_no_other_dylora_module_but_the_math():
    def own(path: Path) -> set[str]:
        return {n for n in imported_modules(path) if n.startswith("dylora.")} - {"dylora.__version__"}

    assert own(SRC / "cards.py") <= {"dylora.files", "dylora.files.write_text", "dylora.functional",
                                     "dylora.functional.rank_coefficient"}
    assert own(SRC / "files.py") == set()


def test_task_plugins_import_neither_each_other_nor_the_skeleton():
    tasks = SRC / "app" / "tasks"
    for task, other in (("classification", "generation"), ("generation", "classification")):
        imported = imported_modules(tasks / f"{task}.py")
        forbidden = {f"dylora.app.tasks.{other}", "dylora.app.run", "dylora.app.cli"}
        assert not {n for n in imported if any(n == f or n.startswith(f + ".") for f in forbidden)}, task


def test_import_dylora_and_its_core_stays_light():
    # a PEFT user's imports load none of the application's dependencies (beyond what transformers' Trainer
    # imports itself when they are installed: it imports datasets)
    code = ("import sys; from transformers import Trainer; before = set(sys.modules); import dylora; "
            "dylora.DyLoraConfig; dylora.get_dylora_model; dylora.resize; dylora.rank_sweep; dylora.DyLoraTrainer; "
            f"print(sorted(m for m in {sorted(APP_DEPENDENCIES)!r} if m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_public_api_is_the_names_a_user_needs_and_editors_see_them():
    # 15-25 names, no deprecated alias, each importable, and each named by a TYPE_CHECKING import
    assert 15 <= len(dylora.__all__) <= 25 and len(set(dylora.__all__)) == len(dylora.__all__)
    assert "rank" not in dylora.__all__ and not {"rank_scale", "set_expected_scale", "SweepRow"} & set(dylora.__all__)
    checked = set()
    for node in ast.walk(ast.parse((SRC / "__init__.py").read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            checked |= {alias.name for stmt in node.body for alias in stmt.names}
    assert checked == set(dylora.__all__)
    for name in set(dylora.__all__) - {"DyLoraSFTTrainer"}:  # that one needs trl (the eco extra)
        assert getattr(dylora, name).__name__ == name


def test_what_left_the_public_api_is_importable_from_its_module():
    import dylora.guard
    import dylora.model
    import dylora.recipes
    import dylora.resizing
    import dylora.sweep
    import dylora.training

    for module, name in ((dylora.model, "set_example_ranks"), (dylora.model, "set_expected_scale"),
                         (dylora.model, "dylora_adapters"), (dylora.training, "step_rank"),
                         (dylora.training, "DyLoraTrainerMixin"), (dylora.recipes, "Recipe"),
                         (dylora.guard, "TrainingGuard"), (dylora.sweep, "SweepRow"),
                         (dylora.sweep, "rank_parameters"), (dylora.resizing, "resize_state_dict"),
                         (dylora.functional, "rank_scale")):
        assert callable(getattr(module, name)), name


def test_the_cli_without_its_extra_says_how_to_install_it(monkeypatch, capsys):
    import dylora.app

    monkeypatch.delitem(sys.modules, "dylora.app.cli", raising=False)
    monkeypatch.setitem(sys.modules, "typer", None)  # as if `pip install dylora` without the cli extra
    assert dylora.app.main(["--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the dylora CLI needs typer, which `pip install 'dylora[cli]'` installs"]


def test_no_module_imports_another_modules_private_names():
    """What one module needs of another is public (a name without a leading underscore, with a docstring): no
    `from .x import _private` in the package, its benchmarks or its tools."""
    root = SRC.parent.parent
    offenders = []
    for path in [*SRC.rglob("*.py"), *(root / "benchmarks").glob("*.py"), *(root / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            own = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("dylora"))
            if own:
                offenders += [f"{path.name}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and alias.name not in ("__version__", "__future__")]
    assert offenders == []


def test_the_options_module_declaring_dylora_options_imports_only_the_standard_library():
    """`dylora.options` is read by the CLI to build `dylora train`'s options before anything heavy is imported."""
    imported = tops(imported_modules(SRC / "options.py"))
    assert imported <= {"__future__", "collections", "dataclasses", "typing"}
    out = subprocess.run([sys.executable, "-c", "import sys, dylora.app.settings; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
