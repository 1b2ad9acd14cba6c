"""The one run skeleton: train -> sweep -> pick -> publish, for every method and every task.

`train` goes from `Settings` to a finished run directory: the task's data and base model, the adapter
(DyLoRA, or plain LoRA / full fine-tuning as baselines) trained with the HF Trainer (checkpoints, resume,
torchrun processes), every rank swept on validation and test, the best rank picked on validation, and all
of it written under `NAME.partial`, renamed to `NAME` only when complete. `read_run`, `load_run` and
`sweep_run` give a saved run back; `export_run` writes one of its ranks (a plain LoRA, a kohya file or a merged
model), `allocate_run` per-layer ranks. Every file of a run directory is written through `RunDir`.

Tasks are plug-ins: `tasks.Task` is their contract, `tasks.task_for` picks one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import files, quantized
from ..config import SIDECAR_NAME
from ..functional import check_rank
from ..guard import StopCause, TrainingGuard
from ..layers import BASES
from ..model import dylora_adapters, get_dylora_model, load, peft_model, read_adapter_config
from ..recipes import RANK_KEY, RANKS_KEY
from ..sweep import SweepRow, rank_parameters, rank_sweep
from ..training import DyLoraTrainer
from . import zoo
from .checkpoint import CompleteCheckpointCallback, newest_complete
from .report import pick_bases, pick_ranks, sweep_payload
from .rundir import RunDir, card_rows, partial_dir
from .settings import GENERATION_DATASETS, Settings
from .tasks import Task, task_for


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
    bases: dict[int, str] = field(default_factory=dict)  # per rank, the basis picked on validation (--basis-rule)


@dataclass
class SavedRun:
    """A run directory (or a bare adapter directory: no record, no sweep) as `read_run` finds it."""

    settings: Settings
    adapter: Path
    record: dict[str, Any] | None = None
    sweep: dict[str, Any] | None = None

    @functools.cached_property
    def config(self) -> Any:
        """The adapter's DyLoraConfig, read once (a missing adapter_config.json raises FileNotFoundError)."""
        return read_adapter_config(self.adapter)

    @property
    def task_type(self) -> str:
        return self.config.task_type if (self.adapter / files.ADAPTER_CONFIG).is_file() else "SEQ_CLS"


# ---------------------------------------------------------------- pieces


def versions() -> dict[str, str]:
    import peft
    import transformers

    from .. import __version__

    return {"dylora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "platform": platform.platform()}


def resolve(s: Settings, task: Task, base: Any) -> Settings:
    """The run's final settings, resolved once against its base model (the token budget, the target modules);
    nothing changes them after."""
    targets = s.target_modules if s.method == "full" else s.target_modules or zoo.default_target_modules(base.config)
    return dataclasses.replace(s, max_length=token_budget(s, task, base.config), target_modules=targets)


def build_model(s: Settings, base: Any, task_type: str) -> Any:
    """The base model with the run's adapter on it (resolved settings: see `resolve`), or the base itself."""
    if s.method == "full":
        return base
    config = s.peft_config(s.target_modules, task_type)
    if s.quantize:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_dylora_model(base, config) if s.method == "dylora" else peft_model(base, config)
    if s.quantize and not any(quantized.quant_kind(m.get_base_layer()) for m in model.modules()
                              if isinstance(m, LoraLayer)):
        raise ValueError(f"--quantize {s.quantize}: no target module ({', '.join(s.target_modules)}) of "
                         f"{type(base).__name__} is a quantized layer; bitsandbytes quantizes nn.Linear layers only, "
                         "so target those (e.g. q_proj,v_proj) or drop --quantize")
    return model


def prepare_out(out: Path, overwrite: bool, resume: bool, main_process: bool) -> Path:
    """Check the run directory and return the `.partial` directory the run writes into."""
    partial = partial_dir(out)
    files.recover(out)
    if out.exists() and not (overwrite or resume):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    files.check_replaceable(out)
    if resume:
        if not partial.exists():
            raise FileNotFoundError(f"nothing to resume: {partial} does not exist")
    elif main_process:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
        except OSError as err:
            raise ValueError(f"cannot create the run directory {partial}: {err.strerror or err}") from None
    return partial


def training_arguments(s: Settings, output_dir: Path, quiet: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=s.epochs, max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_ratio,
        lr_scheduler_type="linear", seed=s.seed, data_seed=s.seed, logging_steps=s.logging_steps,
        train_sampling_strategy="group_by_length", label_smoothing_factor=s.label_smoothing,
        eval_strategy="no", save_strategy="steps" if s.save_steps else "no",
        save_steps=s.save_steps or 500, save_total_limit=None,
        report_to=[], disable_tqdm=quiet, logging_nan_inf_filter=False, use_cpu=not torch.cuda.is_available(),
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
            last = state.log_history[-1] if state.log_history else {}
            if RANK_KEY in last or RANKS_KEY in last:
                post["rank"] = last.get(RANK_KEY, last.get(RANKS_KEY))
            self.training_bar.set_postfix(post, refresh=False)


CALLBACKS_ENV = "DYLORA_CALLBACKS"


def extra_callbacks() -> list[Any]:
    """Trainer callbacks named in $DYLORA_CALLBACKS ("module:Class,..."), each built with no arguments:
    a way to add logging or debugging records to `dylora train` without changing it."""
    import importlib

    found = []
    for spec in filter(None, (x.strip() for x in os.environ.get(CALLBACKS_ENV, "").split(","))):
        module, _, name = spec.partition(":")
        try:
            found.append(getattr(importlib.import_module(module), name)())
        except (ImportError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"{CALLBACKS_ENV}: cannot build {spec!r} ({err}); give module:Class") from None
    return found


class TrainingStopped(RuntimeError):
    """The guard stopped a run that could not be learning; nothing was published (one-line message)."""


def _short(x: float) -> str:
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def stop_reason(cause: StopCause) -> str:
    """The guard's cause in one line with what to try, in `dylora train`'s options: a third of the lr; first a
    smaller lora_alpha where updates were clipped to nothing; a larger lr where its sum over the steps moved no
    weight."""
    if cause.lr_too_small:
        return (f"{cause.what}; the lr is too small to move the weights (AdamW moves each by at most the lr a step: "
                f"{cause.moved:.0e} in all); try --lr 1e-4 or larger")
    hint = f"try --lr {_short(cause.lr / 3)} (a third of {_short(cause.lr)})"
    if cause.clipped and cause.lora_alpha is not None:
        hint = f"try a smaller --lora-alpha (it is {cause.lora_alpha:g}; the scale at rank b is alpha / b) or " \
               f"{hint.removeprefix('try ')}"
    return f"{cause.what}; {hint}"


def train_model(s: Settings, model: Any, args: Any, train_dataset: Any, collator: Any, partial: Path, quiet: bool,
                resume: bool, num_classes: int | None = None,
                callbacks: Sequence[Any] = ()) -> tuple[Any, list[tuple[int, int]]]:
    """Train with the HF Trainer (DyLoRA: `DyLoraTrainer` with the config's recipe), sealed checkpoints, the
    guard, and with `resume` the newest intact checkpoint. Returns the trainer and the (step, rank) history."""
    from transformers import Trainer

    guard = TrainingGuard(num_classes) if s.guard else None
    keeper = CompleteCheckpointCallback()
    callbacks = [c for c in (keeper, guard, *callbacks, *extra_callbacks()) if c is not None]
    kind = DyLoraTrainer if s.method == "dylora" else Trainer
    trainer = kind(model=model, args=args, train_dataset=train_dataset, data_collator=collator, callbacks=callbacks)
    keeper.rank_callback = getattr(trainer, "recipe_callback", None)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not quiet:
        trainer.add_callback(_BarOnly())
    resume_from = newest_complete(RunDir(partial).checkpoints) if resume else None
    if resume_from:
        keeper.restore(resume_from)  # the rank history of the steps before the checkpoint
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if guard is not None and guard.cause is not None:
        raise TrainingStopped(f"training stopped: {stop_reason(guard.cause)}; nothing was published (--no-guard to "
                              "go on)")
    return trainer, (list(keeper.rank_callback.history) if keeper.rank_callback else [])


def sweep(s: Settings, model: Any, task: Task, split: str, ranks: list[int] | None, progress: bool) -> list[SweepRow]:
    """The task's metrics on a split at each rank (DyLoRA), or at the adapter's one rank (baselines)."""
    if dylora_adapters(model):
        # per-example losses on validation, for a basis pick by loss (s.basis_rule), where the task gives them
        examples = split == "validation" and s.basis_rule != "metric" and getattr(task, "example_scores", False)
        return rank_sweep(model, lambda m: task.evaluate(m, split, examples=True) if examples else
                          task.evaluate(m, split), ranks=ranks, progress=progress, basis=s.basis or "both")
    params = rank_parameters(model, s.r) if s.method == "lora" else sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    return [SweepRow(s.r if s.method == "lora" else 0, task.evaluate(model, split), params)]


def token_budget(s: Settings, task: Task, config: Any) -> int:
    """The token budget: the given one or the task's default, capped at the model's positions."""
    limit = zoo.max_positions(config)
    length = s.max_length or task.default_max_length
    return min(length, limit) if limit else length


# ---------------------------------------------------------------- the run


def train(s: Settings, out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
          quiet: bool = False, keep_checkpoints: bool = False, callbacks: Sequence[Any] = ()) -> RunResult | None:
    """Train, sweep every rank, write the run directory. Returns None on processes other than the first.
    `callbacks`: more Trainer callbacks for the training."""
    s = dataclasses.replace(s).validate()  # a copy: the caller's settings are not changed
    out = Path(out)
    t0 = time.perf_counter()
    task = task_for(s)
    model_dir = zoo.resolve_model(s.model)  # bad models, data and targets fail here, before anything is written
    zoo.check_loadable(model_dir)
    task.check_model(model_dir)
    task.load_data()
    task.progress = not quiet
    base, _ = task.load_base(model_dir)
    s = task.s = resolve(s, task, base)
    model = build_model(s, base, task.task_type)
    args = training_arguments(s, RunDir(partial_dir(out)).checkpoints, quiet)
    main = args.process_index == 0
    with files.lock(out) if main else contextlib.nullcontext():
        with args.main_process_first(local=False, desc="prepare the run directory"):  # process 0 (re)creates it
            partial = prepare_out(out, overwrite, resume, main)
        try:
            return _train_and_publish(s, out, partial, task, model, model_dir, args, t0, quiet, resume,
                                      keep_checkpoints, callbacks)
        except BaseException as err:
            # a run the guard stopped is not worth resuming (docs/errors.md: no OUT.partial); else keep what a
            # resume can start from
            if main and (isinstance(err, TrainingStopped)
                         or newest_complete(RunDir(partial).checkpoints, warn=lambda _: None) is None):
                shutil.rmtree(partial, ignore_errors=True)
            raise


def _train_and_publish(s: Settings, out: Path, partial: Path, task: Task, model: Any, model_dir: str, args: Any,
                       t0: float, quiet: bool, resume: bool, keep_checkpoints: bool,
                       callbacks: Sequence[Any] = ()) -> RunResult | None:
    encoded = task.encode(s.max_length)
    trainer, rank_history = train_model(s, model, args, encoded["train"], task.collator(), partial, quiet, resume,
                                        getattr(task, "num_labels", None), callbacks)
    t_train = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return None

    model = trainer.model
    t1 = time.perf_counter()
    val = sweep(s, model, task, "validation", s.ranks, not quiet)
    t_val = time.perf_counter() - t1
    test = sweep(s, model, task, "test", s.ranks, not quiet)
    t_sweep = time.perf_counter() - t1
    metric = task.metrics[0]
    best, smallest = pick_ranks(val, metric, s.within, task.higher_is_better)
    bases = pick_bases(val, metric, task.higher_is_better, s.basis_rule, s.r if s.method == "dylora" else None)
    result = RunResult(out, val, test, best, smallest, metric, rank_history=rank_history, bases=bases)
    picked = [row for row in val if bases[row.rank] == row.basis]

    run_dir = RunDir(partial)
    if s.method != "full":
        run_dir.write_adapter(model)  # its card is written once, below, with the sweep
        facts = {"data": s.data, "method": s.method, "recipe": s.recipe if s.method == "dylora" else None,
                 "steps": trainer.state.global_step, "lr": s.lr, "seed": s.seed,
                 "base quantized": zoo.describe_quantization(**s.quantization())}
        run_dir.write_cards(trainer.model.peft_config["default"], sweep=picked, command=sys.argv, base_model=s.model,
                            training={k: v for k, v in facts.items() if v is not None})
    if not keep_checkpoints:
        run_dir.remove_checkpoints()
    run_dir.write_sweep(sweep_payload(val, test, task.metrics, best, smallest, task.higher_is_better, bases,
                                      s.basis_rule))
    title = f"{s.method} on {task.name} ({Path(s.model).name}, r_max={s.r})"
    run_dir.write_plot(RunDir.SWEEP_PLOT, lambda path: task.plot(path, val, test, title))
    run_dir.write_outputs(task.outputs(best))
    result.timings = {"train_s": round(t_train, 2), "sweep_s": round(t_sweep, 2),
                      "sweep_validation_s": round(t_val, 2), "sweep_test_s": round(t_sweep - t_val, 2),
                      "total_s": round(time.perf_counter() - t0, 2)}
    record = {"settings": dataclasses.asdict(s), "model_dir": model_dir, "versions": versions(),
              "seed": s.seed, "timings": result.timings, "command": sys.argv, "world_size": args.world_size,
              **task.record(), "steps": trainer.state.global_step, "rank_history": rank_history,
              "log_history": trainer.state.log_history}
    run_dir.write_record(record)
    files.replace_dir(partial, out)
    return result


# ---------------------------------------------------------------- saved runs


def read_run(path: str | os.PathLike, model: str | None = None) -> SavedRun:
    """The settings, adapter directory, run.json record and sweep.json of a run directory, or of a bare
    adapter directory (settings then default to the task's model; `model` overrides either)."""
    path = files.readable(path)  # a run a kill left moved aside mid-publish is found (and put back) too
    run_dir = RunDir(path)
    if run_dir.is_run():
        record = run_dir.read_record()
        try:
            settings = Settings.from_dict(record["settings"]).validate()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"corrupted run file {run_dir.run_file}: its settings are missing or invalid "
                             f"({' '.join(str(err).split())})") from None
        sweep = run_dir.read_sweep()
        saved = SavedRun(settings, run_dir.adapter, record, sweep)
    elif (path / files.ADAPTER_CONFIG).is_file():
        saved = SavedRun(Settings(), path)
        if saved.task_type == "CAUSAL_LM":
            from .tasks.generation import GenerationTask

            saved.settings = Settings(model=GenerationTask.default_model, data=GENERATION_DATASETS[0])
    else:
        raise FileNotFoundError(f"{path} is neither a run directory (run.json) nor an adapter (adapter_config.json)")
    if model:
        saved.settings.model = model
    return saved


def load_run(path: str | os.PathLike | SavedRun, model: str | None = None, *,
             with_data: bool = False) -> tuple[Any, Any, SavedRun, Task]:
    """A saved DyLoRA (or plain LoRA, seen as DyLoRA with r_min = 1) adapter on its base model, with its
    tokenizer, the saved run and its task (with the data loaded when `with_data`)."""
    saved = path if isinstance(path, SavedRun) else read_run(path, model)
    if not (saved.adapter / files.ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{saved.adapter.parent} has no adapter (a full fine-tuning run?)")
    task = task_for(saved.settings, saved.task_type)
    model_dir = zoo.resolve_model(saved.settings.model)
    zoo.check_loadable(model_dir)
    task.check_model(model_dir)
    if with_data:
        task.load_data()
    base, tokenizer = task.load_base(model_dir, None if with_data else task.saved_num_labels(saved.adapter,
                                                                                              saved.record))
    return load(base, saved.adapter), tokenizer, saved, task


def default_basis(saved: SavedRun) -> str:
    """The bases a sweep of this adapter evaluates by default: both for DyLoRA, the SVD cut for a plain LoRA
    (whose prefix is the paper's truncated LoRA, never trained to stand alone)."""
    return "both" if (saved.adapter / SIDECAR_NAME).is_file() else "svd"


def export_basis(saved: SavedRun, rank: int) -> str:
    """The basis `dylora export` uses at a rank: the one picked on validation (sweep.json), else the prefix for
    DyLoRA and the SVD cut for a plain LoRA."""
    picked = (saved.sweep or {}).get("picked")
    if isinstance(picked, dict) and picked.get(str(rank)) in BASES:
        return picked[str(rank)]
    return "prefix" if default_basis(saved) == "both" else "svd"


def sweep_run(path: str | os.PathLike, ranks: list[int] | None = None, split: str = "test",
              data: str | None = None, model: str | None = None,
              progress: bool = True, basis: str | None = None) -> tuple[list[SweepRow], Settings, list[str]]:
    """Evaluate a saved run or adapter on a split at chosen ranks (default: all) and bases (default: both for
    DyLoRA, svd for a plain LoRA): (rows, settings, metrics)."""
    saved = read_run(path, model)
    if data:
        if saved.task_type == "CAUSAL_LM":
            raise ValueError("--data applies to classification runs; a generation run is swept on its own data")
        saved.settings.data = data
    cfg = saved.config
    for b in ranks or []:
        check_rank(b, cfg.r_min, cfg.r)  # before loading anything
    model, saved, task = _with_encoded_data(saved, progress)
    rows = rank_sweep(model, lambda m: task.evaluate(m, split), ranks=ranks, progress=progress,
                      basis=basis or default_basis(saved))
    return rows, saved.settings, task.metrics


def _with_encoded_data(saved: SavedRun, progress: bool) -> tuple[Any, SavedRun, Task]:
    """`load_run` with the task's data loaded and encoded."""
    model, _, saved, task = load_run(saved, with_data=True)
    task.progress = progress
    task.encode(token_budget(saved.settings, task, model.config))
    return model, saved, task


def allocate_run(path: str | os.PathLike, budget: float, *, budget_kind: str = "rank", method: str = "norm",
                 calibration: int = 128, step: int = 1, model: str | None = None, min_rank: int | None = None,
                 lazy: bool = True, progress: bool = True, export: str | os.PathLike | None = None,
                 bake_scale: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Per-layer ranks of a saved run within a budget (`dylora.allocate`; greedy on the task's loss over the
    first `calibration` validation rows), scored on validation and test beside uniform truncation with no
    more parameters (r_min where even r_min everywhere costs more). `min_rank=0` lets it switch layers off.
    With `export`, the allocation is also written there as a plain PEFT LoRA (`bake_scale`: each layer's scale
    folded into B). Writes allocation.json and allocation.png in the run directory; returns the record."""
    from ..allocation import allocate, check_average_rank, layer_costs, lowest_rank
    from ..model import at_rank, export_lora, get_layer_ranks, set_layer_ranks
    from .report import plot_allocation

    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ValueError(f"calibration (--calibration) must be a number of validation rows >= 1, got {calibration!r}")
    if export is not None and Path(export).exists() and not overwrite:
        raise FileExistsError(f"{export} exists; pass --overwrite to replace it")
    saved = read_run(path, model)
    cfg = saved.config
    if budget_kind == "rank":  # before loading anything
        check_average_rank(budget, lowest_rank(min_rank, cfg.r_min), cfg.r)
    model, saved, task = _with_encoded_data(saved, progress)
    t0 = time.perf_counter()
    ranks = allocate(model, budget, method, budget_kind=budget_kind, step=step, progress=progress,
                     loss_fn=lambda m: task.calibration_loss(m, calibration), min_rank=min_rank, lazy=lazy)
    seconds = time.perf_counter() - t0
    costs = layer_costs(model)
    params = sum(b * costs[name] for name, b in ranks.items())
    uniform = max(cfg.r_min, min(cfg.r, params // sum(costs.values())))
    previous = get_layer_ranks(model)
    set_layer_ranks(model, ranks)
    allocated = {split: task.evaluate(model, split) for split in ("validation", "test")}
    set_layer_ranks(model, previous)
    with at_rank(model, uniform):
        truncated = {split: task.evaluate(model, split) for split in ("validation", "test")}
    record = {"method": method, "budget": budget, "budget_kind": budget_kind, "ranks": ranks, "params": params,
              "seconds": round(seconds, 3), "metric": task.metrics[0], "r": cfg.r, "allocated": allocated,
              "uniform": {"rank": uniform, "params": uniform * sum(costs.values()), **truncated}}
    if export is not None:  # first: a refused export (every layer at rank 0) leaves the run's files as they were
        export_lora(model, ranks=ranks, path=export, bake_scale=bake_scale, overwrite=overwrite)
    title = f"{method}, budget {budget:g} ({budget_kind})"
    RunDir(path).write_allocation(record, lambda p: plot_allocation(p, ranks, cfg.r, title))
    return record


def choose_rank(spec: str, saved: SavedRun) -> int:
    """b from a rank spec: an integer, best, or smallest-within=X (points), the last two read from the run's
    sweep.json. A bad spec is a ValueError in one line."""
    from .report import pick_ranks, sweep_rows

    if spec.isascii() and spec.isdigit():
        return int(spec)
    if spec != "best" and not spec.startswith("smallest-within="):
        raise ValueError(f"--rank must be an integer, best, or smallest-within=X; got {spec!r}")
    if saved.sweep is None:
        raise ValueError(f"--rank {spec} needs a run directory with sweep.json; {saved.adapter.parent} has none")
    try:
        within = float(spec.split("=", 1)[1]) if spec != "best" else 0.0
    except ValueError:
        raise ValueError(f"--rank smallest-within=X needs a number, got {spec!r}") from None
    if not 0 <= within < float("inf"):
        raise ValueError(f"--rank smallest-within=X needs a finite number of points >= 0, got {spec!r}")
    try:
        if spec == "best":
            return int(saved.sweep["best_rank"])
        return pick_ranks(sweep_rows(saved.sweep), saved.sweep["metric"], within)[1]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"--rank {spec}: the run's sweep.json is incomplete or corrupted ({err!r}); give "
                         "the rank as an integer") from None


EXPORT_FORMATS = ("peft", "kohya")


@dataclass
class Exported:
    """What `export_run` wrote: where, the rank, its basis, and what it is (adapter, kohya or merged)."""

    path: Path
    rank: int
    basis: str
    kind: str


def export_run(path: str | os.PathLike, rank: str = "best", *, out: str | os.PathLike | None = None,
               merge: bool = False, fmt: str = "peft", model: str | None = None, basis: str | None = None,
               overwrite: bool = False, command: Sequence[str] = ()) -> Exported:
    """Write rank b of a run (or adapter) directory: a plain PEFT LoRA with its model card, one kohya .safetensors
    file, or (`merge`) the base model with rank b folded in. `rank` is b, best or smallest-within=X; `basis` the one
    picked on validation unless given; `out` defaults to the run directory's `lora-rB` / `kohya-rB.safetensors` /
    `merged-rB`. Everything is checked before a model is loaded, and nothing is published half-written."""
    from .. import model as model_api

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format must be peft or kohya, got {fmt!r}")
    if fmt == "kohya" and merge:
        raise ValueError("--merge writes a full model; it does not go with --format kohya")
    saved = read_run(path, model)
    b = choose_rank(rank, saved)
    cfg = saved.config
    check_rank(b, cfg.r_min, cfg.r)  # before loading any model
    if basis is not None and basis not in BASES:
        raise ValueError(f"--basis must be {' or '.join(BASES)}, got {basis!r}")
    basis = basis or export_basis(saved, b)
    out = Path(out) if out is not None else RunDir(path).export_path(b, merge=merge, fmt=fmt)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    rows = card_rows(saved.sweep)  # checked before anything is written
    peft_model, tokenizer, _, _ = load_run(saved)
    if merge:
        merged = model_api.merge(peft_model, rank=b, inplace=True, basis=basis)
        with files.atomic_dir(out, overwrite=overwrite) as tmp:
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        return Exported(out, b, basis, "merged")
    if fmt == "kohya":
        from ..kohya import export_kohya

        export_kohya(peft_model, b, out, base_model=saved.settings.model, command=shlex.join(command), basis=basis,
                     overwrite=overwrite)
        return Exported(out, b, basis, "kohya")
    # the card is written in the temporary directory: the adapter is published with it or not at all
    card = {"sweep": rows, "command": list(command), "base_model": saved.settings.model}
    model_api.export_lora(peft_model, rank=b, path=out, overwrite=overwrite, basis=basis, card=card)
    return Exported(out, b, basis, "adapter")
