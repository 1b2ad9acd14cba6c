"""The generation pipeline: DyLoRA on a causal LM for a text-to-text task (`bbc-headlines`).

`run_generation` mirrors `pipeline.run` (the classification pipeline) and reuses its helpers: settings
checked, a `NAME.partial` run directory published by rename only when complete, one adapter trained with the
HF Trainer and the DyLoRA rank sampler, then every rank evaluated on validation and test with greedy,
batched, left-padded decoding (KV cache on) and scored with BLEU, ROUGE-L F1 and target perplexity. The best
rank is picked on validation BLEU.

Prompt format (the same token ids in training and generation)::

    [bos] "Write a short headline for this news paragraph.\\nParagraph:" " <paragraph>" "\\nHeadline:"

followed in training by " <headline>" and EOS. The loss covers the headline and EOS only: prompt tokens and
padding get label -100. Each piece is tokenised on its own and the token ids are concatenated, so the prompt
is exactly the same whether or not a target follows.

Lengths: `Settings.max_length` bounds prompt + target. Its classification default (64) is too short for a
paragraph plus a headline, so when a generation run is given that default it uses `GENERATION_MAX_LENGTH`
(160) instead, and records the value used in run.json (pass another `--max-length` to choose; 64 itself is
read as "not given"). It is further capped at the model's position limit. In training the target is cut to
half the budget and the paragraph is cut so prompt + target fits; in generation the paragraph is cut so the
prompt plus `max_new_tokens` fits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import torch
import typer

from . import data as data_mod
from . import zoo
from .model import dylora_adapters, get_rank, load, rank, save
from .pipeline import (
    RunResult,
    Settings,
    build_model,
    is_main_process,
    pick_ranks,
    prepare_out,
    print_table,
    publish,
    read_run,
    train_model,
    training_arguments,
    versions,
    write_sweep,
)
from .training import SweepRow, rank_parameters, rank_sweep

INSTRUCTION = "Write a short headline for this news paragraph.\nParagraph:"
SEPARATOR = "\nHeadline:"
GENERATION_MAX_LENGTH = 160
MAX_NEW_TOKENS = 24
METRICS = ("bleu", "rougeL", "perplexity")  # the first picks the best rank (higher is better)
N_SAMPLES = 5
IGNORE = -100


# ---------------------------------------------------------------- prompts and tokens


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """[bos] if the tokenizer puts one in front of a text by default (Llama-style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def encode_prompt(tokenizer: Any, source: str, budget: int) -> list[int]:
    """Token ids of the prompt for `source`, the paragraph cut so the prompt has at most `budget` tokens."""
    head = _bos(tokenizer) + _ids(tokenizer, INSTRUCTION)
    tail = _ids(tokenizer, SEPARATOR)
    room = max(0, budget - len(head) - len(tail))
    return head + _ids(tokenizer, " " + source.strip())[:room] + tail


def encode_example(tokenizer: Any, source: str, target: str, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + target + eos; labels = -100 on the prompt, the token ids on target + eos."""
    if tokenizer.eos_token_id is None:
        raise zoo.ModelError("the tokenizer has no eos token to end a generated text with")
    target_ids = _ids(tokenizer, " " + target.strip())[: max(1, max_length // 2)] + [tokenizer.eos_token_id]
    prompt = encode_prompt(tokenizer, source, max_length - len(target_ids))
    return {"input_ids": prompt + target_ids, "labels": [IGNORE] * len(prompt) + target_ids}


class CausalCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) for training and perplexity."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def max_positions(config: Any) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def effective_max_length(s: Settings, config: Any) -> int:
    """The token budget of prompt + target: see the module docstring."""
    default = Settings.__dataclass_fields__["max_length"].default
    length = GENERATION_MAX_LENGTH if s.max_length == default else s.max_length
    limit = max_positions(config)
    return min(length, limit) if limit else length


# ---------------------------------------------------------------- models


def check_causal_lm(model_dir: str, model_name: str, data: str = "bbc-headlines") -> Any:
    """The config of `model_dir`, or a one-line ValueError when it is not a decoder-only causal LM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if not zoo.is_causal_lm(config):
        raise ValueError(f"--model {model_name} is a {config.model_type} model without a causal-LM head; "
                         f"{data} is a generation dataset and needs a decoder-only model (smollm2, a GPT-2, "
                         f"Llama or GPT-NeoX directory)")
    return config


def load_causal_lm(model_dir: str, model_name: str, seed: int = 0) -> tuple[Any, Any]:
    """The causal LM and its tokenizer (pad token set; padding is done by this module)."""
    from transformers import AutoModelForCausalLM, set_seed

    check_causal_lm(model_dir, model_name)
    tokenizer = zoo.load_tokenizer(model_dir, for_generation=True)
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------- generation and scores


@torch.no_grad()
def generate(model: Any, tokenizer: Any, sources: Sequence[str], *, rank_b: int | None = None,
             max_new_tokens: int = MAX_NEW_TOKENS, max_length: int = GENERATION_MAX_LENGTH, batch_size: int = 16,
             progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy headlines for `sources`, batched and left-padded, with the KV cache.

    With `rank_b`, the DyLoRA rank is b for the whole call (`dylora.rank`), restored afterwards.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("no prompts to generate from: give at least one text")
    if any(not isinstance(x, str) or not x.strip() for x in sources):
        raise ValueError("empty prompt: every text to generate from must contain some words")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    budget = max(1, max_length - max_new_tokens)
    prompts = [encode_prompt(tokenizer, x, budget) for x in sources]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    from tqdm.auto import tqdm

    def run_batches() -> None:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            n = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), n), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends at the last column
                ids[row, n - len(prompts[i]):] = torch.as_tensor(prompts[i])
                mask[row, n - len(prompts[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(out[row, n:], skip_special_tokens=True).strip()

    try:
        if rank_b is None:
            run_batches()
        else:
            with rank(model, rank_b):
                run_batches()
    finally:
        model.train(was_training)
    return outputs


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge_score, stemmed), both 0-100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must match")
    if not predictions:
        raise ValueError("no predictions to score: give at least one prediction and reference")
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True))
    return {"bleu": float(bleu), "rougeL": 100.0 * rouge / len(predictions)}


@torch.no_grad()
def perplexity(model: Any, encoded: Any, pad_token_id: int, batch_size: int = 16) -> float:
    """exp(mean NLL of the target tokens); prompt and padding (label -100) are not counted."""
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in DataLoader(encoded, batch_size=batch_size, collate_fn=CausalCollator(pad_token_id)):
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, :-1].float()
            target = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
    finally:
        model.train(was_training)
    return float(torch.exp(torch.tensor(total / max(count, 1))))


def evaluate_generation(model: Any, tokenizer: Any, split: Any, encoded: Any, *, max_length: int,
                        batch_size: int, max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False,
                        desc: str = "generate") -> tuple[dict[str, float], list[str]]:
    """BLEU, ROUGE-L and perplexity of one split at the model's current rank, and the predictions."""
    rank_b = get_rank(model) if dylora_adapters(model) else None
    preds = generate(model, tokenizer, split["source"], rank_b=rank_b, max_new_tokens=max_new_tokens,
                     max_length=max_length, batch_size=batch_size, progress=progress, desc=desc)
    scores = text_scores(preds, split["target"])
    scores["perplexity"] = perplexity(model, encoded, tokenizer.pad_token_id, batch_size)
    return scores, preds


# ---------------------------------------------------------------- results


def plot_generation_sweep(path: str | os.PathLike, validation: list[SweepRow], test: list[SweepRow],
                          title: str = "") -> Path:
    """BLEU and ROUGE-L vs rank (left) and perplexity vs rank (right), validation and test; atomic write."""
    from .plot import plt, save_figure  # the Agg backend

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0), dpi=120)
    for rows, split, marker in ((validation, "validation", "o"), (test, "test", "s")):
        ranks = [row.rank for row in rows]
        left.plot(ranks, [row.metrics["bleu"] for row in rows], marker + "-", label=f"{split} BLEU")
        left.plot(ranks, [row.metrics["rougeL"] for row in rows], marker + "--", label=f"{split} ROUGE-L")
        right.plot(ranks, [row.metrics["perplexity"] for row in rows], marker + "-", label=f"{split}")
    for ax, label in ((left, "score (0-100)"), (right, "target perplexity")):
        ax.set_xlabel("rank b")
        ax.set_ylabel(label)
        ax.set_xticks([row.rank for row in validation])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def encode_split(tokenizer: Any, split: Any, max_length: int, name: str = "") -> Any:
    """Token ids and prompt-masked labels of a (source, target) split."""

    def enc(batch: dict[str, list]) -> dict[str, list]:
        rows = [encode_example(tokenizer, x, y, max_length) for x, y in zip(batch["source"], batch["target"],
                                                                             strict=True)]
        return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}

    return split.map(enc, batched=True, remove_columns=split.column_names, desc=f"tokenize {name}".strip())


def _cap(split: Any, n: int | None) -> Any:
    if n is None:
        return split
    if n < 1:
        raise ValueError(f"--max-eval must be >= 1, got {n}")
    return split.select(range(min(n, len(split))))


def _print_results(result: RunResult, s: Settings, out: Path) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file or pipe: do not squeeze the nine columns into 80 characters
        console = Console(width=150)
    print_table(result, title=f"{s.method} on {s.data} ({s.model}), seed {s.seed}", console=console)
    if s.method == "dylora":
        typer.echo(f"best rank (validation bleu): {result.best_rank}; smallest rank within {s.within} points: "
                   f"{result.smallest_rank}")
    typer.echo(f"wrote {out}/ (adapter, sweep.json, sweep.csv, sweep.png, samples.json, run.json) in "
               f"{result.timings['total_s']:.0f} s")


# ---------------------------------------------------------------- the run


def run_generation(s: Settings, out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                   quiet: bool = False, keep_checkpoints: bool = False, show: bool = True) -> RunResult | None:
    """Train a causal LM adapter on a generation task, sweep every rank, write the run directory."""

    s.validate()
    if s.label_smoothing < 0 or s.label_smoothing >= 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {s.label_smoothing}")
    if s.max_eval is not None and s.max_eval < 1:
        raise ValueError(f"--max-eval must be >= 1, got {s.max_eval}")
    out = Path(out)
    t0 = time.perf_counter()
    model_dir = zoo.resolve_model(s.model)
    config = check_causal_lm(model_dir, s.model, s.data)  # before anything is written
    task = data_mod.load_generation_task(s.data, seed=s.seed, max_train=s.max_train)
    s.max_length = effective_max_length(s, config)
    args = training_arguments(s, out.with_name(out.name + ".partial") / "checkpoints", quiet)
    args.label_smoothing_factor = s.label_smoothing
    with args.main_process_first(local=False):
        partial = prepare_out(out, overwrite, resume)  # process 0 alone (re)creates it
    base, tokenizer = load_causal_lm(model_dir, s.model, s.seed)
    if s.method != "full" and not s.target_modules:
        s.target_modules = zoo.default_target_modules(base.config)
    model = build_model(s, base, task_type="CAUSAL_LM")

    splits = {"train": task.splits["train"], "validation": _cap(task.splits["validation"], s.max_eval),
              "test": _cap(task.splits["test"], s.max_eval)}

    encoded = {name: encode_split(tokenizer, split, s.max_length, name) for name, split in splits.items()}

    trainer, rank_history = train_model(s, model, args, encoded["train"], CausalCollator(tokenizer.pad_token_id),
                                        partial, quiet, resume)
    t_train = time.perf_counter() - t0
    if not is_main_process():
        return None

    model = trainer.model
    t1 = time.perf_counter()
    predictions: dict[str, dict[int, list[str]]] = {"validation": {}, "test": {}}

    def ev(split: str):
        def evaluate(m: Any) -> dict[str, float]:
            b = get_rank(m) if dylora_adapters(m) else (s.r if s.method == "lora" else 0)
            scores, preds = evaluate_generation(m, tokenizer, splits[split], encoded[split], max_length=s.max_length,
                                                batch_size=s.eval_batch_size, progress=not quiet,
                                                desc=f"{split} r={b}")
            predictions[split][b] = preds
            return scores
        return evaluate

    if s.method == "dylora":
        val = rank_sweep(model, ev("validation"), ranks=s.ranks, progress=not quiet)
        test = rank_sweep(model, ev("test"), ranks=s.ranks, progress=not quiet)
    else:
        params = rank_parameters(model, s.r) if s.method == "lora" else sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        b = s.r if s.method == "lora" else 0
        val = [SweepRow(b, ev("validation")(model), params)]
        test = [SweepRow(b, ev("test")(model), params)]
    t_sweep = time.perf_counter() - t1
    best, smallest = pick_ranks(val, METRICS[0], s.within)
    result = RunResult(out, val, test, best, smallest, METRICS[0], rank_history=rank_history)

    if s.method != "full":
        save(model, partial / "adapter")
    if not keep_checkpoints:
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    write_sweep(partial, result, SimpleNamespace(metrics=list(METRICS)))
    test_split = splits["test"]
    samples = {"best_rank": best, "ranks": {
        str(b): [{"source": test_split[i]["source"], "reference": test_split[i]["target"], "prediction": preds[i]}
                 for i in range(min(N_SAMPLES, len(preds)))]
        for b, preds in sorted(predictions["test"].items())}}
    (partial / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    plot_generation_sweep(partial / "sweep.png", val, test,
                          title=f"{s.method} on {task.name} ({Path(s.model).name}, r_max={s.r})")
    result.timings = {"train_s": round(t_train, 2), "sweep_s": round(t_sweep, 2),
                      "total_s": round(time.perf_counter() - t0, 2)}
    record = {"settings": dataclasses.asdict(s), "model_dir": model_dir, "versions": versions(),
              "seed": s.seed, "timings": result.timings, "command": sys.argv,
              "world_size": int(os.environ.get("WORLD_SIZE", "1")), "task": "generation",
              "metrics": list(METRICS), "prompt": {"instruction": INSTRUCTION, "separator": SEPARATOR},
              "max_new_tokens": MAX_NEW_TOKENS, "train_examples": len(encoded["train"]),
              "eval_examples": {k: len(splits[k]) for k in ("validation", "test")},
              "steps": trainer.state.global_step, "rank_history": rank_history,
              "log_history": trainer.state.log_history}
    (partial / "run.json").write_text(json.dumps(record, indent=2, default=str))
    publish(partial, out)
    if show:
        _print_results(result, s, out)
    return result


# ---------------------------------------------------------------- `dylora generate`


def load_generation_run(path: str | os.PathLike, model: str | None = None) -> tuple[Any, Any, Settings, int | None]:
    """(DyLoRA model, tokenizer, settings, best rank or None) of a causal-LM run or bare adapter directory."""
    from .model import read_adapter_config

    s, adapter = read_run(Path(path))
    best = None
    if s is None:
        s = Settings(model=model or "smollm2", data="bbc-headlines")
    else:
        sweep_file = Path(path) / "sweep.json"
        if sweep_file.is_file():
            best = int(json.loads(sweep_file.read_text())["best_rank"])
    if model:
        s.model = model
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} has no adapter to generate with (a full fine-tuning run?)")
    cfg = read_adapter_config(adapter)
    if cfg.task_type != "CAUSAL_LM":
        raise ValueError(f"{adapter} is a {cfg.task_type} adapter, not a causal-LM one; `dylora generate` needs a "
                         f"run trained on a generation dataset such as bbc-headlines")
    base, tokenizer = load_causal_lm(zoo.resolve_model(s.model), s.model, s.seed)
    return load(base, adapter), tokenizer, s, best


def sweep_generation(path: str | os.PathLike, ranks: list[int] | None = None, split: str = "test",
                     quiet: bool = False, model: str | None = None) -> tuple[list[SweepRow], Settings]:
    """BLEU, ROUGE-L and perplexity of a saved causal-LM run at chosen ranks (default: all), on the run's split."""
    peft_model, tokenizer, s, _ = load_generation_run(path, model)
    cfg = dylora_adapters(peft_model)["default"]
    for b in ranks or []:
        if not cfg.r_min <= b <= cfg.r:
            raise ValueError(f"--ranks: rank {b} is outside [r_min, r] = [{cfg.r_min}, {cfg.r}]")
    task = data_mod.load_generation_task(s.data, seed=s.seed, max_train=s.max_train)
    rows = _cap(task.splits[split], s.max_eval)
    limit = max_positions(peft_model.config)
    length = s.max_length if limit is None else min(s.max_length, limit)
    encoded = encode_split(tokenizer, rows, length, split)

    def evaluate(m: Any) -> dict[str, float]:
        return evaluate_generation(m, tokenizer, rows, encoded, max_length=length, batch_size=s.eval_batch_size,
                                   progress=not quiet, desc=f"{split} r={get_rank(m)}")[0]

    return rank_sweep(peft_model, evaluate, ranks=ranks, progress=not quiet), s


def generate_command(
    run: Annotated[Path, typer.Argument(help="A causal-LM run directory (or adapter directory).")],
    text: Annotated[list[str], typer.Argument(help="Paragraph(s) to write a headline for.")],
    rank_b: Annotated[int | None, typer.Option("--rank", help="DyLoRA rank b (default: the run's best).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the run's, or smollm2).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = MAX_NEW_TOKENS,
) -> None:
    """Generate a headline for each TEXT at rank b, one per line."""
    texts = list(text or [])
    if not texts:
        raise ValueError("no prompts to generate from: give at least one text")
    if any(not x.strip() for x in texts):
        raise ValueError("empty prompt: every text to generate from must contain some words")
    peft_model, tokenizer, s, best = load_generation_run(run, model)
    cfg = dylora_adapters(peft_model)["default"]
    b = rank_b if rank_b is not None else (best if best is not None else cfg.r)
    if not cfg.r_min <= b <= cfg.r:
        raise ValueError(f"--rank {b} is outside [r_min, r] = [{cfg.r_min}, {cfg.r}] of {run}")
    limit = max_positions(peft_model.config)
    length = s.max_length if limit is None else min(s.max_length, limit)
    for line in generate(peft_model, tokenizer, texts, rank_b=b, max_new_tokens=max_new_tokens, max_length=length):
        typer.echo(line)
