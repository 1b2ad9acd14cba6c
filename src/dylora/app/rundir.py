"""A run directory: where each of its files lives, and the one reader and writer of each.

`dylora train` writes `NAME.partial/` and renames it to `NAME/` when complete; in it: `adapter/` (the r_max
adapter and its model card), `run.json` (settings, versions, timings, logs), `sweep.json` and `sweep.csv` (a row
per rank: the basis picked on validation and its metrics), `sweep.png`, `samples.json` (a generation run's
predictions), `README.md` (the run's model card), `checkpoints/` (while training, or kept); `dylora allocate` writes
`allocation.json` and `allocation.png`; `dylora export` writes `lora-rB/`, `merged-rB/` or `kohya-rB.safetensors`
by default. Every write goes through `dylora.files` (a temporary name, then a rename) and through a method here,
which names the file to `wrote` (a subclass may record them); every read checks what it reads.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import files


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run that will be published as `out` is written until it is complete: `out.partial`."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class RunDir:
    """One run directory (finished or `.partial`), by its path."""

    ADAPTER, RUN, CARD, CHECKPOINTS = "adapter", "run.json", "README.md", "checkpoints"
    SWEEP, SWEEP_CSV, SWEEP_PLOT, SAMPLES = "sweep.json", "sweep.csv", "sweep.png", "samples.json"
    ALLOCATION, ALLOCATION_PLOT = "allocation.json", "allocation.png"
    # what `dylora train` lists as written, in this order
    TRAIN_FILES = (ADAPTER, SWEEP, SWEEP_CSV, SWEEP_PLOT, SAMPLES, RUN, CARD, CHECKPOINTS)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def wrote(self, name: str) -> None:
        """Called with each file's name (relative to the run directory) as it is written: a hook for subclasses."""

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def adapter(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def checkpoints(self) -> Path:
        """Where the Trainer writes its checkpoints (`training_arguments`' output_dir)."""
        self.wrote(self.CHECKPOINTS)
        return self.path / self.CHECKPOINTS

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
        self.wrote(self.RUN)
        return files.write_text(self.run_file, json.dumps(record, indent=2, default=str))

    # ---------------------------------------------------------------- the adapter, its cards, checkpoints

    def write_adapter(self, model: Any) -> Path:
        """The r_max adapter (PEFT's files and the DyLoRA sidecar), its card left to `write_cards`."""
        from ..model import save

        self.wrote(self.ADAPTER)
        save(model, self.adapter, card=False)
        return self.adapter

    def write_cards(self, config: Any, **card: Any) -> None:
        """The model card (`dylora.cards.write_card` keywords), in the adapter and as the run's README.md."""
        from ..cards import write_card

        for where in (self.adapter, self.path):
            self.wrote(self.CARD if where == self.path else f"{self.ADAPTER}/{self.CARD}")
            write_card(where, config, filename=self.CARD, **card)

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.path / self.CHECKPOINTS, ignore_errors=True)

    def written(self) -> list[str]:
        """The files of a finished `dylora train` present here, in `TRAIN_FILES` order."""
        return [name for name in self.TRAIN_FILES if (self.path / name).exists()]

    # ---------------------------------------------------------------- plots and task outputs

    def write_plot(self, name: str, draw: Callable[[Path], Any]) -> Path:
        """A figure: `draw(path)` writes it (the report's plots write to a temporary name, then rename)."""
        self.wrote(name)
        draw(self.path / name)
        return self.path / name

    def write_outputs(self, outputs: dict[str, Any]) -> None:
        """A task's own files (`Task.outputs`): JSON documents by name, e.g. samples.json."""
        for name, payload in outputs.items():
            self.wrote(name)
            files.write_text(self.path / name, json.dumps(payload, indent=2, ensure_ascii=False))

    # ---------------------------------------------------------------- exports

    def export_path(self, rank: int, *, merge: bool = False, fmt: str = "peft") -> Path:
        """Where `dylora export` writes rank b by default: merged-rB/, kohya-rB.safetensors or lora-rB/."""
        name = f"merged-r{rank}" if merge else f"kohya-r{rank}.safetensors" if fmt == "kohya" else f"lora-r{rank}"
        self.wrote(name)
        return self.path / name

    # ---------------------------------------------------------------- sweep.json / sweep.csv

    def read_sweep(self) -> dict[str, Any] | None:
        """sweep.json, checked (an object whose "rows" is a list of objects), or None when there is none."""
        if not self.sweep_file.is_file():
            return None
        return check_sweep(files.read_json(self.sweep_file, "sweep file"), self.sweep_file)

    def write_sweep(self, payload: dict[str, Any]) -> None:
        """sweep.json and sweep.csv (the same rows)."""
        self.wrote(self.SWEEP)
        self.wrote(self.SWEEP_CSV)
        files.write_json(self.sweep_file, payload)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(payload["rows"][0]))
        writer.writeheader()
        writer.writerows(payload["rows"])
        files.write_text(self.path / self.SWEEP_CSV, text.getvalue())

    # ---------------------------------------------------------------- allocation.json

    def write_allocation(self, record: dict[str, Any], draw: Callable[[Path], Any]) -> tuple[Path, Path]:
        """allocation.json (the record) and allocation.png (`draw(path)`)."""
        plot = self.write_plot(self.ALLOCATION_PLOT, draw)
        self.wrote(self.ALLOCATION)
        files.write_json(self.path / self.ALLOCATION, record)
        return self.path / self.ALLOCATION, plot


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


__all__ = ["RunDir", "card_rows", "check_sweep", "partial_dir"]
