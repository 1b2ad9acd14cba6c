"""Checkpoints a kill cannot break: a manifest marks a Trainer checkpoint complete and verifies its files.

The HF Trainer writes `checkpoint-N/` file by file. After it finishes, `CompleteCheckpointCallback`
writes `dylora-complete.json` (each file's size and sha256) under a temporary name and renames it, so
a checkpoint is complete exactly when its manifest exists. `newest_complete` returns the newest
checkpoint whose manifest exists and whose files still match it, saying which ones it skipped and why.

In a distributed run every process takes part in each save (each writes its own `rng_state_<i>.pth`), so
the callback waits for all of them (a barrier) before process 0 writes the manifest. The DyLoRA rank
history up to the checkpoint is saved beside it (`dylora-ranks.json`, covered by the manifest) so a resumed
run reports the whole rank sequence, not only the steps it ran itself.

`RankTraceCallback` is a debugging record for checking distributed runs: with `DYLORA_RANK_TRACE=DIR` set,
every process writes `DIR/ranks-<RANK>.json` with the rank each training forward (micro-batch) ran at and
a hash of each trainable tensor at the end of training. Run files are written by process 0 only.
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

from .files import write_text

MANIFEST = "dylora-complete.json"
RANKS = "dylora-ranks.json"
PREFIX = "checkpoint-"
TRACE_ENV = "DYLORA_RANK_TRACE"


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
    return None


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


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

    With a `rank_callback` (a `DyLoraCallback`), its rank history goes into the checkpoint too, and
    `restore(checkpoint)` puts it back in front of the history of a resumed run.
    """

    def __init__(self, rank_callback: Any = None) -> None:
        self.rank_callback = rank_callback

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every process has saved its RNG state into the checkpoint
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
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
        step = int(Path(checkpoint).name[len(PREFIX):])
        saved = [(s, b) for s, b in json.loads(path.read_text())["history"] if s < step]
        self.rank_callback.history[:0] = saved


def _tensor_digest(t: Any) -> str:
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


class RankTraceCallback(TrainerCallback):
    """Records, in this process, the rank of every training forward and the trained weights (for tests).

    Writes `directory/ranks-<RANK>.json` at the end of training: `forwards` is a list of
    [optimizer step, rank, sha256 of the micro-batch's input_ids (16 hex digits)] per micro-batch (the
    data order), `weights` maps each trainable parameter to the sha256 of its float32 values.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.forwards: list[list[Any]] = []
        self._step = 0
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .model import get_rank

        def hook(module, args, kwargs):
            if module.training:
                ids = kwargs.get("input_ids", args[0] if args else None)
                batch = _tensor_digest(ids)[:16] if ids is not None else ""
                self.forwards.append([self._step, get_rank(module), batch])

        self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._handle is not None:
            self._handle.remove()
        record = {"rank": _process_index(), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                  "steps": state.global_step, "forwards": self.forwards,
                  "weights": {n: _tensor_digest(p) for n, p in model.named_parameters() if p.requires_grad}}
        self.directory.mkdir(parents=True, exist_ok=True)
        write_text(self.directory / f"ranks-{_process_index()}.json", json.dumps(record))


def trace_from_env() -> RankTraceCallback | None:
    """A `RankTraceCallback` writing under $DYLORA_RANK_TRACE, or None when it is unset."""
    directory = os.environ.get(TRACE_ENV)
    return RankTraceCallback(directory) if directory else None
