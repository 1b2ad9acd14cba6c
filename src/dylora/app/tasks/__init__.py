"""Task plug-ins of the run skeleton: what a task supplies (`Task`) and which task a run is (`task_for`).

A task is built from the run's settings; it loads its data and base model, encodes and collates it, evaluates a
model at the model's current rank, and writes its own outputs. A new task is a new class beside
`classification.ClassificationTask` and `generation.GenerationTask`, and a line in `task_for`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..settings import Settings


@runtime_checkable
class Task(Protocol):
    """The contract between the run skeleton (`dylora.app.run`) and a task."""

    task_type: str  # PEFT's task type: "SEQ_CLS" or "CAUSAL_LM"
    higher_is_better: bool  # of the first metric, which picks the best rank
    progress: bool  # progress bars while evaluating
    default_max_length: int
    default_model: str  # a name in `dylora.app.zoo`

    @property
    def name(self) -> str: ...  # the dataset's name in tables and plots

    @property
    def metrics(self) -> list[str]: ...  # the first picks the best rank

    def load_data(self) -> None: ...
    def check_model(self, model_dir: str) -> None: ...  # raise ValueError when the model cannot do the task
    def load_base(self, model_dir: str, num_labels: int | None = None) -> tuple[Any, Any]: ...  # model, tokenizer
    def saved_num_labels(self, adapter: Path, record: dict[str, Any] | None) -> int | None: ...
    def encode(self, max_length: int) -> dict[str, Any]: ...  # split name -> encoded dataset
    def collator(self) -> Any: ...
    def evaluate(self, model: Any, split: str) -> dict[str, float]: ...  # at the model's current rank
    def calibration_loss(self, model: Any, n_rows: int) -> float: ...  # for per-layer rank allocation
    def plot(self, path: Path, validation: list, test: list, title: str) -> None: ...
    def outputs(self, best_rank: int) -> dict[str, Any]: ...  # the task's own files: JSON documents by name
    def record(self) -> dict[str, Any]: ...  # the task's run.json fields


def task_for(s: Settings, task_type: str | None = None) -> Task:
    """The task plug-in of a dataset (or of a saved adapter's PEFT task type)."""
    from ..settings import GENERATION_DATASETS

    generation = task_type == "CAUSAL_LM" if task_type else s.data in GENERATION_DATASETS
    if generation:
        from .generation import GenerationTask

        return GenerationTask(s)
    from .classification import ClassificationTask

    return ClassificationTask(s)
