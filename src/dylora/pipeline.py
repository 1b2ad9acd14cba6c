"""The train-once, sweep-every-rank pipeline behind `dylora train` and `dylora lora` (classification).

One function, `run`, goes from settings to a finished run directory: data and model from the registries,
DyLoRA (or plain LoRA, or full fine-tuning as baselines) trained with the HF Trainer, every rank swept on
validation and test, the best rank picked on validation, and everything written under a temporary
`NAME.partial` directory that is renamed to `NAME` only when complete.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import data as data_mod
from . import zoo
from .config import DyLoraConfig
from .model import dylora_adapters, get_dylora_model, load, replace_dir, save
from .sampler import RankSampler
from .training import RANK_KEY, DyLoraCallback, SweepRow, rank_parameters, rank_sweep

METHODS = ("dylora", "lora", "full")
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class Settings:
    """Everything that defines a run; written to run.json so a result can be reproduced."""

    model: str = "minilm"
    data: str = "polarity"
    method: str = "dylora"  # dylora | lora | full
    r: int = 8
    r_min: int = 1
    lora_alpha: float = 16
    frozen: bool = False
    distribution: str = "uniform"
    geometric_p: float = 0.15
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    batch_size: int = 16
    grad_accum: int = 1
    eval_batch_size: int = 64
    max_length: int = 64
    seed: int = 0
    max_train: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    text_pair_column: str | None = None
    save_steps: int = 0  # checkpoint every N optimizer steps (0: no checkpoints)
    modules_to_save: list[str] | None = None  # trained in full beside the adapter (default: the task head)
    logging_steps: int = 10
    within: float = 0.5  # "smallest rank within this many points of the best"
    max_eval: int | None = None  # cap the validation and test splits (quick runs and tests)
    label_smoothing: float = 0.0  # label_smoothing_factor of the Trainer (generation)
    ranks: list[int] | None = None  # the ranks the sweep evaluates (default: every b in [r_min, r])

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is invalid: choose one of {', '.join(METHODS)}")
        for name in ("epochs", "lr", "batch_size", "max_length", "eval_batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.method == "dylora":  # DyLoraConfig names the field and the valid range
            self.peft_config(["x"])
            bad = [b for b in self.ranks or [] if not self.r_min <= b <= self.r]
            if bad or self.ranks == []:
                raise ValueError(f"--ranks {bad or '(empty)'}: each rank must be in [r_min, r] = "
                                 f"[{self.r_min}, {self.r}]")

    def peft_config(self, targets: list[str], task_type: str = "SEQ_CLS") -> Any:
        from peft import LoraConfig

        common = dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                      target_modules=targets, task_type=task_type, modules_to_save=self.modules_to_save)
        if self.method == "dylora":
            return DyLoraConfig(r_min=self.r_min, frozen=self.frozen, rank_distribution=self.distribution,
                                geometric_p=self.geometric_p, seed=self.seed, **common)
        if not 1 <= self.r:
            raise ValueError(f"--r must be >= 1, got {self.r}")
        return LoraConfig(**common)


@dataclass
class RunResult:
    out: Path
    validation: list[SweepRow]
    test: list[SweepRow]
    best_rank: int
    smallest_rank: int
    metric: str
    timings: dict[str, float] = field(default_factory=dict)
    rank_history: list[tuple[int, int]] = field(default_factory=list)


# ---------------------------------------------------------------- pieces


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_data(s: Settings) -> data_mod.TaskData:
    """The task's seeded splits; with `max_eval`, validation and test cut to their first max_eval rows."""
    if s.max_eval is not None and s.max_eval < 1:
        raise ValueError(f"--max-eval must be >= 1, got {s.max_eval}")
    task = data_mod.load_task(s.data, text_column=s.text_column, label_column=s.label_column,
                              text_pair_column=s.text_pair_column, seed=s.seed, max_train=s.max_train)
    if s.max_eval is not None:
        for split in ("validation", "test"):
            task.splits[split] = task.splits[split].select(range(min(s.max_eval, len(task.splits[split]))))
    return task


def tokenize(task: data_mod.TaskData, tokenizer: Any, max_length: int) -> Any:
    pair = "text_pair" in task.splits["train"].column_names

    def enc(batch: dict[str, list]) -> dict[str, list]:
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        return tokenizer(*args, truncation=True, max_length=max_length)

    cols = [c for c in task.splits["train"].column_names if c != "label"]
    return task.splits.map(enc, batched=True, remove_columns=cols, desc="tokenize")


def load_base(model_dir: str, num_labels: int, seed: int) -> tuple[Any, Any]:
    """The sequence-classification model and its tokenizer, with a pad token set."""
    from transformers import AutoModelForSequenceClassification, set_seed

    tokenizer = zoo.load_tokenizer(model_dir)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_model(s: Settings, base: Any, task_type: str = "SEQ_CLS") -> Any:
    """The base model with the run's adapter (DyLoRA or LoRA) on it, or the base itself for full fine-tuning."""
    if s.method == "full":
        return base
    targets = s.target_modules or zoo.default_target_modules(base.config)
    config = s.peft_config(targets, task_type)
    if s.method == "dylora":
        return get_dylora_model(base, config)
    from peft import get_peft_model

    return get_peft_model(base, config)


@torch.no_grad()
def evaluate(model: Any, dataset: Any, tokenizer: Any, metrics: list[str], batch_size: int = 64) -> dict[str, float]:
    """Predict a tokenised split and score it (batches of similar length, so little padding)."""
    from transformers import DataCollatorWithPadding

    was_training = model.training
    model.eval()
    collate = DataCollatorWithPadding(tokenizer)
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    preds = torch.empty(len(rows), dtype=torch.long)
    labels = torch.empty(len(rows), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([rows[i] for i in idx])
        labels[idx] = batch.pop("labels")
        preds[idx] = model(**batch).logits.argmax(-1)
    model.train(was_training)
    return data_mod.compute_metrics(metrics, preds.numpy(), labels.numpy())


def pick_ranks(rows: list[SweepRow], metric: str, within: float) -> tuple[int, int]:
    """(best rank, smallest rank within `within` points of the best), both chosen on these rows."""
    best = max(rows, key=lambda row: (row.metrics[metric], -row.rank))
    smallest = min(row.rank for row in rows if row.metrics[metric] >= best.metrics[metric] - within)
    return best.rank, smallest


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory` (see `dylora.checkpoint`), or None."""
    from .checkpoint import newest_complete

    return newest_complete(directory)


def versions() -> dict[str, str]:
    import peft
    import transformers

    from . import __version__

    return {"dylora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "platform": platform.platform()}


# ---------------------------------------------------------------- writing results


def write_sweep(out: Path, result: RunResult, task: data_mod.TaskData) -> None:
    rows = []
    test_by_rank = {row.rank: row for row in result.test}
    for v in result.validation:
        t = test_by_rank[v.rank]
        rows.append({"rank": v.rank, "params": v.params,
                     **{f"validation_{k}": x for k, x in v.metrics.items()},
                     **{f"test_{k}": x for k, x in t.metrics.items()}})
    payload = {"metric": result.metric, "metrics": task.metrics, "best_rank": result.best_rank,
               "smallest_rank_within": result.smallest_rank, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(payload, indent=2))
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(result: RunResult, title: str, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    test_by_rank = {row.rank: row for row in result.test}
    names = list(result.validation[0].metrics)
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("params", justify="right")
    for split in ("val", "test"):
        for name in names:
            table.add_column(f"{split} {name}", justify="right")
    table.add_column("")
    for v in result.validation:
        t = test_by_rank[v.rank]
        marks = []
        if v.rank == result.best_rank:
            marks.append("best")
        if v.rank == result.smallest_rank:
            marks.append("smallest within")
        table.add_row(str(v.rank), f"{v.params:,}", *[f"{v.metrics[n]:.2f}" for n in names],
                      *[f"{t.metrics[n]:.2f}" for n in names], ", ".join(marks))
    console.print(table)


# ---------------------------------------------------------------- the run


def prepare_out(out: Path, overwrite: bool, resume: bool) -> Path:
    """Check the run directory and return the `.partial` directory the run writes into."""
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not (overwrite or resume):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if resume:
        if not partial.exists():
            raise FileNotFoundError(f"nothing to resume: {partial} does not exist")
    elif is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    return partial


def publish(partial: Path, out: Path) -> None:
    """Rename the finished `.partial` directory into place (replacing an old run)."""
    replace_dir(partial, out)


def training_arguments(s: Settings, output_dir: Path, quiet: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=s.epochs, max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_ratio,
        lr_scheduler_type="linear", seed=s.seed, data_seed=s.seed, logging_steps=s.logging_steps,
        train_sampling_strategy="group_by_length",
        eval_strategy="no", save_strategy="steps" if s.save_steps else "no",
        save_steps=s.save_steps or 500, save_total_limit=None,
        report_to=[], disable_tqdm=quiet, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=True, log_level="error",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        # every LoRA weight takes part in every forward (the rank is a mask), so DDP need not search for unused ones
        ddp_find_unused_parameters=False if s.method != "full" else None,
    )


class _BarOnly(ProgressCallback):
    """The Trainer's progress bar (rate, ETA) with loss and rank in its postfix, without printing log dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            post = {"loss": f"{float(logs['loss']):.3f}"}
            if RANK_KEY in (state.log_history[-1] if state.log_history else {}):
                post["rank"] = state.log_history[-1][RANK_KEY]
            self.training_bar.set_postfix(post, refresh=False)


def quiet_progress(trainer: Any, quiet: bool) -> None:
    """A bar without per-step log printing, or (quiet) nothing at all."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not quiet:
        trainer.add_callback(_BarOnly())


def train_model(s: Settings, model: Any, args: Any, train_dataset: Any, collator: Any, partial: Path, quiet: bool,
                resume: bool) -> tuple[Any, list[tuple[int, int]]]:
    """Train with the HF Trainer: one sampled rank per step (DyLoRA), sealed checkpoints, and with `resume`
    the newest intact checkpoint. Returns the trainer and the (step, rank) history."""
    from transformers import Trainer

    from .checkpoint import CompleteCheckpointCallback, trace_from_env

    callbacks: list[Any] = []
    dy_callback = None
    if s.method == "dylora":
        dy_callback = DyLoraCallback(RankSampler.from_config(dylora_adapters(model)["default"]))
        callbacks.append(dy_callback)
    keeper = CompleteCheckpointCallback(dy_callback)
    callbacks += [keeper, *filter(None, [trace_from_env()])]
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                      callbacks=callbacks)
    quiet_progress(trainer, quiet)
    resume_from = None
    if resume:
        found = latest_checkpoint(partial / "checkpoints")
        if found:
            resume_from = str(found)
            keeper.restore(found)  # the rank history of the steps before the checkpoint
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, (list(dy_callback.history) if dy_callback else [])


def run(s: Settings, out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
        quiet: bool = False, keep_checkpoints: bool = False) -> RunResult | None:
    """Train, sweep every rank, write the run directory. Returns None on non-main processes."""
    from transformers import DataCollatorWithPadding

    s.validate()
    out = Path(out)
    t0 = time.perf_counter()
    args = training_arguments(s, out.with_name(out.name + ".partial") / "checkpoints", quiet)
    model_dir = zoo.resolve_model(s.model)  # bad model or data fail here, before anything is written
    task = load_data(s)
    with args.main_process_first(local=False, desc="prepare the run directory"):  # process 0 alone (re)creates it
        partial = prepare_out(out, overwrite, resume)
    base, tokenizer = load_base(model_dir, task.num_labels, s.seed)
    model = build_model(s, base)
    encoded = tokenize(task, tokenizer, s.max_length)

    trainer, rank_history = train_model(s, model, args, encoded["train"], DataCollatorWithPadding(tokenizer),
                                        partial, quiet, resume)
    t_train = time.perf_counter() - t0
    if not is_main_process():
        return None

    model = trainer.model
    t1 = time.perf_counter()

    def ev(split: str):
        return lambda m: evaluate(m, encoded[split], tokenizer, task.metrics, s.eval_batch_size)

    if s.method == "dylora":
        val = rank_sweep(model, ev("validation"), ranks=s.ranks, progress=not quiet)
        t_val = time.perf_counter() - t1
        test = rank_sweep(model, ev("test"), ranks=s.ranks, progress=not quiet)
    else:
        params = rank_parameters(model, s.r) if s.method == "lora" else sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        b = s.r if s.method == "lora" else 0
        val = [SweepRow(b, ev("validation")(model), params)]
        t_val = time.perf_counter() - t1
        test = [SweepRow(b, ev("test")(model), params)]
    t_sweep = time.perf_counter() - t1
    metric = task.metrics[0]
    best, smallest = pick_ranks(val, metric, s.within)
    result = RunResult(out, val, test, best, smallest, metric, rank_history=rank_history)

    if s.method != "full":
        save(model, partial / "adapter")
    if not keep_checkpoints:
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    write_sweep(partial, result, task)
    if s.method == "dylora":
        from .plot import plot_sweep

        plot_sweep(partial / "sweep.png", result.validation, result.test, metric,
                   title=f"DyLoRA on {task.name} ({s.model}, r_max={s.r})")
    result.timings = {"train_s": round(t_train, 2), "sweep_s": round(t_sweep, 2),
                      "sweep_validation_s": round(t_val, 2), "sweep_test_s": round(t_sweep - t_val, 2),
                      "total_s": round(time.perf_counter() - t0, 2)}
    record = {"settings": dataclasses.asdict(s), "model_dir": model_dir, "versions": versions(),
              "seed": s.seed, "timings": result.timings, "command": sys.argv,
              "world_size": int(os.environ.get("WORLD_SIZE", "1")), "label_names": task.label_names,
              "metrics": task.metrics, "train_examples": len(encoded["train"]),
              "steps": trainer.state.global_step, "rank_history": rank_history,
              "log_history": trainer.state.log_history}
    (partial / "run.json").write_text(json.dumps(record, indent=2, default=str))
    publish(partial, out)
    return result


def read_run(path: Path) -> tuple[Settings | None, Path]:
    """(settings, adapter dir) of a run directory, or (None, path) for a bare adapter directory."""
    path = Path(path)
    if (path / "run.json").is_file():
        record = json.loads((path / "run.json").read_text())
        known = {f.name for f in dataclasses.fields(Settings)}
        return Settings(**{k: v for k, v in record["settings"].items() if k in known}), path / "adapter"
    if (path / "adapter_config.json").is_file():
        return None, path
    raise FileNotFoundError(f"{path} is neither a run directory (run.json) nor an adapter (adapter_config.json)")


def load_run_model(s: Settings, adapter: Path, num_labels: int) -> tuple[Any, Any]:
    """A saved DyLoRA (or plain LoRA, seen as DyLoRA with r_min = 1) adapter on its base model."""
    base, tokenizer = load_base(zoo.resolve_model(s.model), num_labels, s.seed)
    return load(base, adapter), tokenizer


def sweep_saved(path: Path, data: str | None, ranks: list[int] | None, quiet: bool = False,
                model: str | None = None, split: str = "test") -> tuple[list[SweepRow], Settings, Any]:
    """Evaluate a saved run or adapter at chosen ranks."""
    s, adapter = read_run(path)
    if s is None:
        s = Settings(model=model or "minilm")
    if data:
        s.data = data
    if model:
        s.model = model
    task = load_data(s)
    peft_model, tokenizer = load_run_model(s, adapter, task.num_labels)
    encoded = tokenize(task, tokenizer, s.max_length)
    cfg = peft_model.peft_config["default"]
    for b in ranks or []:
        if not cfg.r_min <= b <= cfg.r:
            raise ValueError(f"--ranks: rank {b} is outside [r_min, r] = [{cfg.r_min}, {cfg.r}]")
    rows = rank_sweep(peft_model, lambda m: evaluate(m, encoded[split], tokenizer, task.metrics, s.eval_batch_size),
                      ranks=ranks, progress=not quiet)
    return rows, s, task


def steps_per_epoch(n_train: int, s: Settings, world_size: int = 1) -> int:
    return math.ceil(n_train / (s.batch_size * s.grad_accum * world_size))
