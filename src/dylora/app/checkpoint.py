"""Checkpoints a kill cannot break: a manifest marks a Trainer checkpoint complete and verifies its files.

The HF Trainer writes `checkpoint-N/` file by file. After it finishes, `CompleteCheckpointCallback`
writes `dylora-complete.json` (each file's size and sha256) under a temporary name and renames it, so
a checkpoint is complete exactly when its manifest exists. `newest_complete` returns the newest
checkpoint whose manifest exists and whose files still match it, saying which ones it skipped and why.

In a distributed run every process takes part in each save (each writes its own `rng_state_<i>.pth`), so
the callback waits for all of them (a barrier) before process 0 writes the manifest. The DyLoRA rank
history up to the checkpoint is saved beside it (`dylora-ranks.json`, covered by the manifest) so a resumed
run reports the whole rank sequence, not only the steps it ran itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..files import write_text

MANIFEST = "dylora-complete.json"
RANKS = "dylora-ranks.json"
CHECKPOINT_PREFIX = "checkpoint-"
TORCH_FILES = (".pt", ".pth")  # what the Trainer's resume reads with torch.load: rng_state, optimizer, scheduler


def _process_index() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    """Wait for every process of a distributed run (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    files = {str(p.relative_to(checkpoint)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_text(checkpoint / MANIFEST, json.dumps({"files": files}, indent=1), fsync=True)


def verify(checkpoint: Path) -> str | None:
    """None if the checkpoint is complete and intact, else a short reason."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return "incomplete (no manifest: the save was interrupted)"
    try:
        files = json.loads(manifest.read_text())["files"]
        if not files:
            return f"corrupted manifest {MANIFEST} (it lists no files)"
        {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()}  # every entry well-formed
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError):
        return f"corrupted manifest {MANIFEST}"
    for name, meta in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"missing file {name}"
        size = path.stat().st_size
        if size != meta["size"]:
            return f"corrupted file {name} (truncated: {size} bytes, expected {meta['size']})"
        if _sha256(path) != meta["sha256"]:
            return f"corrupted file {name} (sha256 differs from the manifest)"
        if path.suffix in TORCH_FILES and (why := _refused_by_torch_load(path)):
            return f"corrupted file {name} ({why})"
    return None


def _refused_by_torch_load(path: Path) -> str | None:
    """Why the Trainer's resume would refuse `path` (its `torch.load(weights_only=True)`, numpy allowed), or
    None: a checkpoint that holds a pickle is then skipped like a corrupted one, not a traceback mid-resume.
    Memory-mapped, so an optimizer state is not read twice."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 (a hostile file may raise anything; each is a refusal)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        why = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("WeightsUnpickler error:")),
                   lines[0])
        if "mmap can only be used" in why:  # not the zip format every torch.save since 1.6 writes
            why = "not a file torch.save writes"
        return f"torch.load(weights_only=True) refuses it: {why.split('. ')[0].rstrip('.')}"
    return None


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True)


def _warn(msg: str) -> None:
    if _process_index() == 0:  # one message per run, not one per process
        print(msg, file=sys.stderr)


def newest_complete(directory: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest intact checkpoint; each newer broken one is reported in one line and skipped."""
    warn = warn or _warn
    found = checkpoints(Path(directory))
    for ckpt in found:
        reason = verify(ckpt)
        if reason is None:
            return ckpt
        warn(f"dylora: skipping checkpoint {ckpt}: {reason}; falling back to the previous one")
    if found:
        warn(f"dylora: no intact checkpoint in {directory}; training from step 0")
    return None


class CompleteCheckpointCallback(TrainerCallback):
    """After each Trainer save, once every process has written its part, mark the checkpoint complete.

    With a `rank_callback` (the `RecipeCallback` a `DyLoraTrainer` keeps as `recipe_callback`, which `run.train_model`
    sets here), its rank history goes into the checkpoint too; `restore(checkpoint)` puts it back in front of a
    resumed run's history.
    """

    def __init__(self, rank_callback: Any = None) -> None:
        self.rank_callback = rank_callback

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every process has saved its RNG state into the checkpoint
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if ckpt.is_dir():
                if self.rank_callback is not None:
                    history = [[int(s), int(b)] for s, b in self.rank_callback.history]
                    write_text(ckpt / RANKS, json.dumps({"history": history}), fsync=True)
                write_manifest(ckpt)

    def restore(self, checkpoint: Path) -> None:
        """Prepend the rank history saved in `checkpoint` (the steps before it) to the rank callback's."""
        path = Path(checkpoint) / RANKS
        if self.rank_callback is None or not path.is_file():
            return
        step = int(Path(checkpoint).name[len(CHECKPOINT_PREFIX):])
        saved = [(s, b) for s, b in json.loads(path.read_text())["history"] if s < step]
        self.rank_callback.history[:0] = saved
