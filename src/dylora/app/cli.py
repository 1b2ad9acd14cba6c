"""The `dylora` command line: train once, sweep every rank, pick and export a rank."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click import exceptions as click_exc
from typer._click.core import ParameterSource
from typer._click.globals import get_current_context

from .. import __version__

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="DyLoRA: train a LoRA adapter once over every rank, then use any rank.")

Out = Annotated[Path | None, typer.Option(help="Run directory (default runs/<model>-<data>-<method>).")]


class UsageFailure(Exception):
    """A bad argument: printed as one line, exit code 2."""


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"dylora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass  # the options of `dylora` itself, before a command


def _given(*names: str) -> list[str]:
    """Of the options `names` (parameter names), those the user gave (on the command line or in the environment),
    as `--option` names."""
    ctx = get_current_context()
    return [f"--{n.replace('_', '-')}" for n in names
            if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]


def _refuse_unused(names: tuple[str, ...], applies: bool, when: str) -> None:
    """Refuse options that would be silently ignored: `names` apply only `when` (not the case here)."""
    given = _given(*names)
    if given and not applies:
        raise UsageFailure(f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} only {when}")


def _parse_ranks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageFailure(f"--ranks must be comma-separated integers like 1,2,4,8, got {text!r}") from None


def _default_out(model: str, data: str, method: str) -> Path:
    stem = lambda x: Path(x).stem if os.sep in x or "." in x else x  # noqa: E731
    return Path("runs") / f"{stem(model)}-{stem(data)}-{method}"


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)  # a log or a pipe: do not squeeze the columns


def _sweep_table(title: str, rows: list, metrics: list[str], test: list | None = None, marks: dict | None = None,
                 picked: dict | None = None):
    """One row per rank (per rank and basis when two bases were swept): params, each metric (validation and test
    when both are given), and marks ("picked" on the basis picked on validation by --basis-rule, best and smallest
    within)."""
    from rich.table import Table

    table = Table(title=title)
    bases = list(dict.fromkeys(row.basis for row in rows))
    table.add_column("rank", justify="right")
    if len(bases) > 1:
        table.add_column("basis")
    table.add_column("params", justify="right")
    splits = [("val ", rows), ("test ", test)] if test is not None else [("", rows)]
    for prefix, _ in splits:
        for name in metrics:
            table.add_column(f"{prefix}{name}", justify="right")
    if marks is not None or (picked is not None and len(bases) > 1):
        table.add_column("")
    by = [{(row.rank, row.basis): row for row in split_rows} for _, split_rows in splits]
    for row in rows:
        cells = [f"{table_rows[row.rank, row.basis].metrics[n]:.2f}" for table_rows in by for n in metrics]
        chosen = picked is None or len(bases) == 1 or picked.get(row.rank) == row.basis
        notes = (["picked"] if picked is not None and len(bases) > 1 and chosen else []) + \
            (marks.get(row.rank, []) if marks is not None and chosen else [])
        table.add_row(str(row.rank), *([row.basis] if len(bases) > 1 else []), f"{row.params:,}", *cells,
                      *([", ".join(notes)] if marks is not None or (picked is not None and len(bases) > 1) else []))
    return table


def _train(method: str, kw: dict[str, Any], out: Path | None, overwrite: bool, resume: bool, keep_checkpoints: bool,
           no_guard: bool, quiet: bool) -> None:
    from .settings import Settings

    targets, ranks = kw.pop("target_modules"), kw.pop("ranks", None)
    s = Settings(method=method, target_modules=[t.strip() for t in targets.split(",")] if targets else None,
                 ranks=_parse_ranks(ranks), guard=not no_guard, **kw).validate()
    _hush(quiet)  # after the checks: a mistyped option is refused before the training stack is imported
    from .run import train
    from .rundir import RunDir

    if method == "dylora":  # options that only one recipe or distribution reads (their `when`, dylora.options)
        import dataclasses

        for f in dataclasses.fields(s):
            if "when" in f.metadata:
                words, applies = f.metadata["when"]
                _refuse_unused((f.name,), bool(applies(s)), words)
    out = out or _default_out(s.model, s.data, method)
    result = train(s, out, overwrite=overwrite, resume=resume, quiet=quiet, keep_checkpoints=keep_checkpoints,
                   callbacks=[_stop_on_interrupt()])
    if result is None:  # not the main process of a distributed run
        return
    marks: dict[int, list[str]] = {}
    marks.setdefault(result.best_rank, []).append("best")
    marks.setdefault(result.smallest_rank, []).append("smallest within")
    metrics = list(result.validation[0].metrics)
    _console().print(_sweep_table(f"{method} on {s.data} ({s.model}), seed {s.seed}", result.validation, metrics,
                                  result.test, marks, result.bases))
    if method == "dylora":
        typer.echo(f"best rank (validation {result.metric}): {result.best_rank} "
                   f"({result.bases[result.best_rank]}); smallest rank within {s.within} points: "
                   f"{result.smallest_rank} ({result.bases[result.smallest_rank]})")
    written = ", ".join(RunDir(out).written())
    typer.echo(f"wrote {out}/ ({written}) in {result.timings['total_s']:.0f} s")


_INTERRUPTED = threading.Event()


def _on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C: remember it, then interrupt as Python does (a library may swallow that KeyboardInterrupt, e.g.
    when it lands in a weakref callback during an import; `_stop_on_interrupt` raises it again)."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _stop_on_interrupt() -> Any:
    """A Trainer callback that raises KeyboardInterrupt at the next step once Ctrl-C was pressed."""
    from transformers import TrainerCallback

    class StopOnInterrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if _INTERRUPTED.is_set():
                raise KeyboardInterrupt

        on_step_begin = on_step_end

    return StopOnInterrupt()


def _hush(quiet: bool) -> None:
    """Hide library chatter (load reports, weight-loading bars); with --quiet, every progress bar."""
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if quiet:
        datasets.disable_progress_bars()


_RUN_OPTIONS: dict[str, tuple[Any, Any]] = {  # the options of `train` and `lora` that are not Settings
    "out": (Out, None),
    "overwrite": (Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")], False),
    "resume": (Annotated[bool, typer.Option("--resume", help="Resume from the newest complete checkpoint.")], False),
    "keep_checkpoints": (Annotated[bool, typer.Option("--keep-checkpoints", help="Keep checkpoints.")], False),
    "no_guard": (Annotated[bool, typer.Option("--no-guard", help="Do not stop a run whose loss is not finite or "
                                              "stays at chance.")], False),
    "quiet": (Annotated[bool, typer.Option("--quiet", help="No progress bars.")], False),
}


def _train_command(method: str) -> Any:
    """`train` or `lora`: an option per setting with help (see `Settings`; lists are comma-separated text),
    then the run's own options."""
    import dataclasses
    import inspect
    import typing

    from .settings import DyLoraSettings, Settings

    hints = typing.get_type_hints(Settings)
    params = []
    dylora = {f.name for f in dataclasses.fields(DyLoraSettings)}  # shown after the run's own settings
    for f in sorted(dataclasses.fields(Settings), key=lambda f: f.name in dylora):
        if "help" in f.metadata and not (method == "lora" and f.metadata.get("train_only")):
            hint = hints[f.name]
            kind = str | None if any(typing.get_origin(t) is list for t in typing.get_args(hint)) else hint
            option = typer.Option(*f.metadata["flags"], help=f.metadata["help"])
            params.append((f.name, Annotated[kind, option], f.default))
    params += [(name, kind, default) for name, (kind, default) in _RUN_OPTIONS.items()]

    def command(**kw: Any) -> None:
        _train(method, kw, **{name: kw.pop(name) for name in _RUN_OPTIONS})

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=k) for n, k, d in params])
    return command


app.command("train", help="Train one DyLoRA adapter, sweep every rank on validation and test, save all.")(
    _train_command("dylora"))
app.command("lora", help="The baseline: the same pipeline with plain LoRA at one fixed rank --r.")(
    _train_command("lora"))


@app.command(help="Evaluate a saved run or adapter at chosen ranks.")
def sweep(
    run_or_adapter: Annotated[Path, typer.Argument(help="A run directory or an adapter directory.")],
    data: Annotated[str | None, typer.Option(help="Dataset (default: the run's).")] = None,
    ranks: Annotated[str | None, typer.Option(help="Comma-separated ranks (default: all).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the run's, or minilm).")] = None,
    split: Annotated[str, typer.Option(help="validation or test.")] = "test",
    basis: Annotated[str | None, typer.Option(help="prefix, svd or both (default: both for DyLoRA, svd for a plain "
                                              "LoRA).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
) -> None:
    from .run import sweep_run
    from .settings import SWEEP_BASES

    _hush(quiet)
    if split not in ("validation", "test"):
        raise UsageFailure(f"--split must be validation or test, got {split!r}")
    if basis is not None and basis not in SWEEP_BASES:
        raise UsageFailure(f"--basis must be one of {', '.join(SWEEP_BASES)}, got {basis!r}")
    rows, s, metrics = sweep_run(run_or_adapter, _parse_ranks(ranks), split, data, model, progress=not quiet,
                                 basis=basis)
    _console().print(_sweep_table(f"{run_or_adapter} on {s.data} ({split})", rows, metrics))


@app.command(help="Write one rank as a plain PEFT LoRA adapter, or with --merge as a merged full model.")
def export(
    run_or_adapter: Annotated[Path, typer.Argument(help="A run directory or an adapter directory.")],
    rank: Annotated[str, typer.Option(help="b, best, or smallest-within=X (points).")] = "best",
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Fold rank b into the base model and save it.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="peft (an adapter directory) or kohya (one .safetensors file "
                                     "for A1111 / ComfyUI / diffusers, from a UNet or text encoder).")] = "peft",
    model: Annotated[str | None, typer.Option(help="Base model (default: the run's, or minilm).")] = None,
    basis: Annotated[str | None, typer.Option(help="prefix or svd (default: the one picked on validation at this "
                                              "rank; else prefix for DyLoRA, svd for a plain LoRA).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    from .run import export_run

    _hush(True)
    done = export_run(run_or_adapter, rank, out=out, merge=merge, fmt=fmt, model=model, basis=basis,
                      overwrite=overwrite, command=sys.argv)
    what = {"merged": "the base model with rank {b} ({basis}) merged", "kohya": "a kohya LoRA file of rank {b} "
            "({basis})", "adapter": "a plain PEFT LoRA adapter of rank {b} ({basis})"}[done.kind]
    typer.echo(f"wrote {what.format(b=done.rank, basis=done.basis)} to {done.path}")


@app.command(help="Choose a rank per layer within a budget, after training; score it beside uniform truncation.")
def allocate(
    run_or_adapter: Annotated[Path, typer.Argument(help="A run directory or an adapter directory.")],
    budget: Annotated[float | None, typer.Option(help="Average rank per layer, in [r_min, r] (or [0, r] with "
                                                 "--allow-off).")] = None,
    params: Annotated[int | None, typer.Option(help="Or: the number of adapter parameters.")] = None,
    method: Annotated[str, typer.Option(help="norm (data-free, fast) or greedy (calibration loss).")] = "norm",
    calibration: Annotated[int, typer.Option(help="Greedy: validation rows of the calibration loss.")] = 128,
    step: Annotated[int, typer.Option(help="Greedy: components a round adds to one layer.")] = 1,
    allow_off: Annotated[bool, typer.Option("--allow-off", help="Let layers go to rank 0 (switched off); the "
                                            "budget may then be any average rank in [0, r].")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Greedy: try every layer every round (slower) instead "
                                        "of only the most promising one.")] = False,
    export: Annotated[Path | None, typer.Option(help="Also write the allocation as a plain PEFT LoRA here.")] = None,
    bake_scale: Annotated[bool, typer.Option("--bake-scale", help="Export: fold each layer's scale into B "
                                             "(for tools that ignore alpha_pattern).")] = False,
    model: Annotated[str | None, typer.Option(help="Base model (default: the run's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --export directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
) -> None:
    from ..allocation import ALLOCATION_METHODS
    from .run import allocate_run
    from .rundir import RunDir

    _hush(quiet)
    if (budget is None) == (params is None):
        raise UsageFailure("give one budget: --budget (an average rank) or --params (adapter parameters)")
    if method not in ALLOCATION_METHODS:
        raise UsageFailure(f"--method must be one of {', '.join(ALLOCATION_METHODS)}, got {method!r}")
    _refuse_unused(("calibration", "step", "exact"), method == "greedy", "with --method greedy")
    _refuse_unused(("bake_scale", "overwrite"), export is not None, "with --export DIR")
    kind, value = ("rank", budget) if budget is not None else ("params", params)
    record = allocate_run(run_or_adapter, value, budget_kind=kind, method=method, calibration=calibration,
                          step=step, model=model, min_rank=0 if allow_off else None, lazy=not exact,
                          progress=not quiet, export=export, bake_scale=bake_scale, overwrite=overwrite)
    from rich.table import Table

    metric, uniform = record["metric"], record["uniform"]
    table = Table(title=f"{run_or_adapter}: {method} allocation, budget {value:g} ({kind})")
    for column in ("ranks", "params", f"val {metric}", f"test {metric}"):
        table.add_column(column, justify="right")
    mean_rank = sum(record["ranks"].values()) / len(record["ranks"])
    table.add_row(f"per layer (mean {mean_rank:.2f})", f"{record['params']:,}",
                  *(f"{record['allocated'][s][metric]:.2f}" for s in ("validation", "test")))
    table.add_row(f"uniform b={uniform['rank']}", f"{uniform['params']:,}",
                  *(f"{uniform[s][metric]:.2f}" for s in ("validation", "test")))
    _console().print(table)
    if export is not None:
        typer.echo(f"wrote a plain PEFT LoRA with these ranks to {export}")
    run_dir = RunDir(run_or_adapter)
    typer.echo(f"allocated in {record['seconds']:.1f} s; wrote {run_dir.path / RunDir.ALLOCATION} and "
               f"{run_dir.path / RunDir.ALLOCATION_PLOT}")


@app.command(help="Shrink any PEFT LoRA adapter by the SVD cut (no base model): one rank, or per-layer ranks.")
def resize(
    adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory (dylora's, or trained elsewhere).")],
    out: Annotated[Path, typer.Option(help="Output directory (a plain PEFT LoRA with a model card).")],
    rank: Annotated[int | None, typer.Option(help="Rank b in every layer, in [1, r].")] = None,
    sv_fro: Annotated[float | None, typer.Option(help="Per layer: the smallest rank keeping this fraction, in "
                                                 "(0, 1], of the update's Frobenius norm.")] = None,
    sv_ratio: Annotated[float | None, typer.Option(help="Per layer: keep singular values >= the largest / X "
                                                   "(X >= 1).")] = None,
    params: Annotated[int | None, typer.Option(help="Per layer, one global threshold: at most this many adapter "
                                               "parameters.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    from ..resizing import resize as resize_adapter

    given = _given("rank", "sv_fro", "sv_ratio", "params")
    if len(given) != 1:
        raise UsageFailure("give exactly one of --rank, --sv-fro, --sv-ratio, --params; got "
                           f"{', '.join(given) or 'none'}")
    if out.exists() and not overwrite:
        raise UsageFailure(f"{out} exists; pass --overwrite to replace it")
    path = resize_adapter(adapter, out, rank=rank, sv_fro=sv_fro, sv_ratio=sv_ratio, params=params,
                          overwrite=overwrite, command=sys.argv)
    typer.echo(f"wrote a plain PEFT LoRA adapter cut by SVD to {path}")


@app.command(help="Generate text (a headline for each paragraph) from a causal-LM run at rank b.")
def generate(
    run: Annotated[Path, typer.Argument(help="A causal-LM run directory (or adapter directory).")],
    text: Annotated[list[str] | None, typer.Argument(help="Paragraph(s) to write a headline for.")] = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", help="Read a paragraph from this file (- for "
                                                     "stdin), for one too long for the command line; repeatable.")
                      ] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="DyLoRA rank b (default: the run's best).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the run's, or smollm2).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate (at most the model's context less "
                                                "the prompt).")] = 24,
) -> None:
    from ..functional import check_rank
    from .run import choose_rank, export_basis, load_run, read_run, token_budget
    from .tasks.generation import generate

    _hush(True)
    text = [*(text or []), *(_read_input(x) for x in inputs or [])]
    if not text:
        raise UsageFailure("no paragraph to generate from: give it as an argument or with --input FILE (- for stdin)")
    if any(not x.strip() for x in text):
        raise UsageFailure("empty prompt: every text to generate from must contain some words")
    saved = read_run(run, model)
    if saved.task_type != "CAUSAL_LM":
        raise UsageFailure(f"{saved.adapter} is not a causal-LM adapter; `dylora generate` needs a run trained "
                           f"on a generation dataset such as bbc-headlines")
    cfg = saved.config
    b = rank if rank is not None else choose_rank("best", saved) if saved.sweep else cfg.r
    check_rank(b, cfg.r_min, cfg.r)
    peft_model, tokenizer, saved, task = load_run(saved)
    length = token_budget(saved.settings, task, peft_model.config)
    for line in generate(peft_model, tokenizer, text, rank_b=b, max_new_tokens=max_new_tokens, max_length=length,
                         basis=export_basis(saved, b), prompt=task.prompt):
        typer.echo(line)


def _read_input(name: str) -> str:
    """The text of `--input NAME`: a UTF-8 file, or stdin for -."""
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageFailure(f"cannot read --input {name}: {getattr(err, 'strerror', None) or err}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is one line on stderr and exit code 2 (a run the guard stopped: 3), never a
    traceback. While it runs, sys.argv reads `dylora ARGS` (run.json and model cards record it)."""
    args = sys.argv[1:] if argv is None else list(argv)
    saved, sys.argv = sys.argv, ["dylora", *args]
    _INTERRUPTED.clear()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if in_main else None
    try:
        return _main(args)
    finally:
        sys.argv = saved
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _train_only(err: Exception) -> str | None:
    """For `dylora lora --recipe ...` (an option of `dylora train` only): a line saying so, else None."""
    ctx = getattr(err, "ctx", None)
    if not isinstance(err, click_exc.NoSuchOption) or ctx is None or ctx.info_name != "lora":
        return None
    train = typer.main.get_command(app).commands["train"]
    if not any(err.option_name in p.opts or err.option_name in p.secondary_opts for p in train.params):
        return None
    return (f"{err.option_name} is an option of `dylora train` (DyLoRA): `dylora lora` trains a plain LoRA at one "
            "rank --r, so it has no such option")


def _main(args: list[str]) -> int:
    command = typer.main.get_command(app)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from registry packages, never from a hub at run time
    # imported by PEFT when installed, bitsandbytes and torchao warn at import about kernels this machine lacks
    # (a CPU kernel fetched from a hub, CUDA libraries), and torch about torchao's enums: not the user's concern
    for name in ("bitsandbytes", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        rv = command.main(args=args, prog_name="dylora", standalone_mode=False)
        if rv == 130:  # typer's answer to Ctrl-C
            raise KeyboardInterrupt
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("dylora: interrupted; nothing was published", file=sys.stderr)
        return 130
    except click_exc.ClickException as e:
        print(f"dylora: error: {_train_only(e) or ' '.join(e.format_message().split())}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "TrainingStopped":  # dylora.app.run.TrainingStopped, without importing torch here
            raise
        print(f"dylora: {e}", file=sys.stderr)
        return 3
    except (UsageFailure, ValueError, FileNotFoundError, FileExistsError) as e:  # DataError, ModelError too
        if os.environ.get("DYLORA_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"dylora: error: {message}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:  # a full disk, a read-only or vanished directory, no memory
        if os.environ.get("DYLORA_DEBUG"):
            raise
        print(f"dylora: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__name__ != "SafetensorError" or os.environ.get("DYLORA_DEBUG"):
            raise
        from ..files import os_error  # a write error in safetensors (a full disk under PEFT's save_pretrained)

        print(f"dylora: error: {os_error(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
