"""A run directory: where each of its files lives, and the one reader and writer of each.

`dylora train` writes `NAME.partial/` and renames it to `NAME/` when complete; in it: `adapter/` (the r_max
adapter and its model card), `run.json` (settings, versions, timings, logs), `sweep.json` and `sweep.csv` (a row
per rank: the basis picked on validation and its metrics), `sweep.png`, `README.md` (the run's model card),
`checkpoints/` (while training, or kept); `dylora allocate` writes `allocation.json` beside its plot.
Every write goes through `dylora.files` (a temporary name, then a rename); every read checks what it reads.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .. import files


class RunDir:
    """One run directory (finished or `.partial`), by its path."""

    RUN, SWEEP, SWEEP_CSV, ALLOCATION, CARD = "run.json", "sweep.json", "sweep.csv", "allocation.json", "README.md"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def run_file(self) -> Path:
        return self.path / self.RUN

    @property
    def sweep_file(self) -> Path:
        return self.path / self.SWEEP

    def is_run(self) -> bool:
        """A run directory has run.json (a bare adapter directory has adapter_config.json only)."""
        return self.run_file.is_file()

    # ---------------------------------------------------------------- run.json

    def read_record(self) -> Any:
        """run.json as written (read_run checks its settings)."""
        return files.read_json(self.run_file, "run file")

    def write_record(self, record: dict[str, Any]) -> Path:
        return files.write_text(self.run_file, json.dumps(record, indent=2, default=str))

    # ---------------------------------------------------------------- sweep.json / sweep.csv

    def read_sweep(self) -> dict[str, Any] | None:
        """sweep.json, checked (an object whose "rows" is a list of objects), or None when there is none."""
        if not self.sweep_file.is_file():
            return None
        return check_sweep(files.read_json(self.sweep_file, "sweep file"), self.sweep_file)

    def write_sweep(self, payload: dict[str, Any]) -> None:
        """sweep.json and sweep.csv (the same rows)."""
        files.write_json(self.sweep_file, payload)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(payload["rows"][0]))
        writer.writeheader()
        writer.writerows(payload["rows"])
        files.write_text(self.path / self.SWEEP_CSV, text.getvalue())

    # ---------------------------------------------------------------- allocation.json

    def write_allocation(self, record: dict[str, Any]) -> Path:
        path = self.path / self.ALLOCATION
        files.write_json(path, record)
        return path


def check_sweep(sweep: Any, path: Path) -> dict[str, Any]:
    """sweep.json as `RunDir.write_sweep` writes it (an object whose "rows" is a list of objects), or one line."""
    rows = sweep.get("rows", []) if isinstance(sweep, dict) else None
    if not isinstance(sweep, dict):
        got = f"a {type(sweep).__name__}"
    elif not isinstance(rows, list):
        got = f"rows that are a {type(rows).__name__}"
    else:
        got = next((f"a row that is a {type(row).__name__}" for row in rows if not isinstance(row, dict)), "")
    if got:
        raise ValueError(f"corrupted sweep file {path}: an object with a list of row objects was expected, got {got}")
    return sweep


def card_rows(sweep: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The rows a model card shows of a sweep.json: per rank, its picked basis's parameters (where the row has
    them) and metrics; a row without its rank is refused in one line."""
    rows = (sweep or {}).get("rows", [])
    if any("rank" not in row for row in rows):
        raise ValueError("corrupted sweep file: a row has no rank; give the rank as an integer, or re-run the sweep")
    return [{"rank": row["rank"], "params": row.get("params"),
             "metrics": {k: v for k, v in row.items() if k.startswith(("validation_", "test_"))}}
            for row in rows] or None


__all__ = ["RunDir", "card_rows", "check_sweep"]
