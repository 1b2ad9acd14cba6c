"""A debugging record for distributed tests, plugged into `dylora train` with DYLORA_CALLBACKS.

With `DYLORA_CALLBACKS=rank_trace:RankTraceCallback`, `DYLORA_RANK_TRACE=DIR` and this folder on PYTHONPATH,
every process writes `DIR/ranks-<process index>.json`: the step, rank, input-batch hash and rank-scale hash of
each training forward, and a hash of each trained tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dylora.files import write_text

TRACE_ENV = "DYLORA_RANK_TRACE"


def _process_index() -> int:
    return int(os.environ.get("RANK", "0"))


def _tensor_digest(t: Any) -> str:
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


class RankTraceCallback(TrainerCallback):
    """Records, in this process, the rank of every training forward and the trained weights (for tests).

    Writes `directory/ranks-<RANK>.json` at the end of training: `forwards` is a list of
    [optimizer step, rank, sha256 of the micro-batch's input_ids, sha256 of the first DyLoRA layer's rank
    scale (a vector, or a matrix of per-example ranks)] (16 hex digits each) per forward (the data order),
    `weights` maps each trainable parameter to the sha256 of its float32 values.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory or os.environ[TRACE_ENV])
        self.forwards: list[list[Any]] = []
        self._step = 0
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from dylora.layers import SCALE_BUFFERS
        from dylora.model import get_rank

        def uniform_rank(module):  # None while the forward uses a rank per example (rowwise) or the expected scale
            try:
                return get_rank(module)
            except RuntimeError:
                return None

        scales = next(getattr(m, SCALE_BUFFERS) for m in model.modules() if hasattr(m, SCALE_BUFFERS))

        def hook(module, args, kwargs):
            if module.training:
                ids = kwargs.get("input_ids", args[0] if args else None)
                batch = _tensor_digest(ids)[:16] if ids is not None else ""
                scale = _tensor_digest(next(iter(scales.values())))[:16]
                self.forwards.append([self._step, uniform_rank(module), batch, scale])

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


