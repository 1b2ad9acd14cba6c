"""Model cards: a README.md beside every adapter dylora writes, in the format PEFT and the Hub read.

YAML front matter as PEFT writes it (`library_name: peft`, `base_model`, `tags`), then what a user of the
file needs: the rank b of r_max, lora_alpha and the rank scaling, the target modules, how it was trained,
the rank sweep and the command that made it. PEFT's `save_pretrained` writes its own card first; this one
keeps its front matter (tags, pipeline_tag) and replaces its placeholder text.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import write_text
from .functional import rank_coefficient

TAGS = ("dylora", "lora", "peft")
PAPER = "https://arxiv.org/abs/2210.07558"


def _get(row: Any, name: str, default: Any = None) -> Any:
    return row.get(name, default) if isinstance(row, Mapping) else getattr(row, name, default)


def sweep_table(sweep: Sequence[Any]) -> str:
    """A markdown table of a rank sweep: `SweepRow`s or dicts with rank, metrics (a dict) and params."""
    rows = [(_get(r, "rank"), dict(_get(r, "metrics") or {}), _get(r, "params")) for r in sweep]
    metrics = list(dict.fromkeys(k for _, m, _ in rows for k in m))
    has_params = any(p is not None for _, _, p in rows)
    head = ["rank", *metrics, *(["params"] if has_params else [])]

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, m, p in rows:
        lines.append("| " + " | ".join([cell(b), *(cell(m.get(k)) for k in metrics),
                                        *([cell(p)] if has_params else [])]) + " |")
    return "\n".join(lines)


def _targets(config: Any) -> str:
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        return f"`{targets}` (a regular expression)"
    return ", ".join(f"`{t}`" for t in sorted(targets or [])) or "(none)"


def _rank_line(config: Any, rank: int | Mapping[str, int] | None, trained: bool = True) -> str:
    r, r_min = config.r, getattr(config, "r_min", 1)
    if rank is None:
        return f"every rank b in [r_min, r_max] = [{r_min}, {r}] (choose one with `dylora.set_rank`)"
    if isinstance(rank, Mapping):
        ranks = sorted(rank.values())
        off = f"; {ranks.count(0)} layers off, see `exclude_modules`" if 0 in ranks else ""
        return f"per-layer ranks from {ranks[0]} to {ranks[-1]} (r_max = {r}; see `rank_pattern`{off})"
    return f"{rank} of r_max = {r}" + (f" (trained over every rank in [{r_min}, {r}])" if trained else "")


def card_text(config: Any, *, rank: int | Mapping[str, int] | None = None, sweep: Sequence[Any] | None = None,
              command: str | Sequence[str] | None = None, training: Mapping[str, Any] | None = None,
              files: Sequence[str] | None = None, kohya: bool = False,
              resize: Mapping[str, Any] | None = None) -> str:
    """The markdown body of a DyLoRA model card (no front matter); with `resize`, of a `dylora resize` output."""
    from peft import __version__ as peft_version

    from . import __version__

    scaling = getattr(config, "rank_scaling", "alpha/b")
    title = "DyLoRA adapter" if rank is None else (f"DyLoRA adapter at rank {rank}" if isinstance(rank, int)
                                                   else "DyLoRA adapter with per-layer ranks")
    fmt = "a kohya-ss LoRA file" if kohya else ("a PEFT LoRA adapter" if rank is not None else
                                                "a PEFT LoRA adapter at r_max, with a `dylora_config.json` sidecar")
    about = (f"A [DyLoRA]({PAPER}) adapter: one LoRA trained over every rank b in [r_min, r_max], so any rank can "
             f"be cut from it without retraining. This is {fmt}.")
    if resize is not None:
        title = title.replace("DyLoRA adapter at", "LoRA adapter resized to").replace("DyLoRA", "Resized LoRA")
        about = (f"A plain PEFT LoRA adapter made by `dylora resize` from {resize.get('source', 'a LoRA adapter')}: "
                 "each layer holds the best rank-b_l approximation (Eckart-Young, the SVD cut) of that layer's "
                 "update, so neither retraining nor the base model was needed.")
    lines = [f"# {title}", "", about, "",
             "## Adapter", "",
             f"- rank: {_rank_line(config, rank, trained=resize is None)}",
             f"- lora_alpha: {config.lora_alpha}",
             f"- rank_scaling: `{scaling}` (the output at rank b is W0 x + c(b) B[:, :b] A[:b] x, "
             f"c(b) = lora_alpha / {scaling.split('/', 1)[1]})"]
    if isinstance(rank, int):
        lines.append(f"- scale at rank {rank}: {rank_coefficient(rank, config.lora_alpha, scaling):g}")
    lines += [f"- target modules: {_targets(config)}"]
    if files:
        lines.append("- files: " + ", ".join(f"`{f}`" for f in files))
    lines += ["", "## Usage", "", "```python"]
    if kohya:
        name = files[0] if files else "lora.safetensors"
        lines += ["pipe.load_lora_weights(directory, weight_name=" + repr(name) + ")  # diffusers",
                  "# A1111 / ComfyUI: put the file in models/Lora like any other LoRA"]
    elif rank is None:
        lines += ["import dylora", "", "model = dylora.load(base_model, directory)",
                  f"dylora.set_rank(model, {getattr(config, 'r_min', 1)})  # any rank in [r_min, r_max]"]
    else:
        lines += ["from peft import PeftModel", "", "model = PeftModel.from_pretrained(base_model, directory)"]
    lines += ["```", ""]
    how = {"recipe": getattr(config, "recipe", None), "rank_distribution": getattr(config, "rank_distribution", None),
           "frozen": getattr(config, "frozen", None), "seed": getattr(config, "seed", None), **(training or {})}
    how = {k: v for k, v in how.items() if v is not None}
    if how:
        lines += ["## Training", "", *(f"- {k}: {v}" for k, v in how.items()), ""]
    if resize:
        lines += ["## Resize", "", *(f"- {k}: {v}" for k, v in resize.items()), ""]
    if sweep:
        lines += ["## Rank sweep", "", sweep_table(sweep), ""]
    if command:
        text = command if isinstance(command, str) else shlex.join(command)
        lines += ["## Command", "", "```bash", text, "```", ""]
    lines += ["### Framework versions", "", f"- PEFT {peft_version}", f"- dylora {__version__}", ""]
    return "\n".join(lines)


def write_card(directory: str | os.PathLike, config: Any, *, rank: int | Mapping[str, int] | None = None,
               sweep: Sequence[Any] | None = None, command: str | Sequence[str] | None = None,
               base_model: str | None = None, training: Mapping[str, Any] | None = None,
               filename: str = "README.md", files: Sequence[str] | None = None, kohya: bool = False,
               resize: Mapping[str, Any] | None = None) -> Path:
    """Write (or rewrite) `directory/README.md`: a DyLoRA model card for `config` (a `DyLoraConfig`).

    `rank`: the rank b the files hold (an int, or {module: b_l} for per-layer ranks), None for the whole
    DyLoRA adapter. `sweep`: `SweepRow`s (or dicts with rank, metrics, params) for the table. `command`: the
    command line that made it. `training`: more facts for the Training section (steps, lr, data ...).
    `resize`: the facts of a `dylora resize` output (source, method, ranks, kept energy), its own section.
    The front matter of an existing card (PEFT's) is kept: tags are added to, base_model and library_name set.
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(directory) / filename
    data = ModelCard.load(path).data if path.is_file() else ModelCardData()
    data.library_name = "peft"
    base_model = base_model or getattr(config, "base_model_name_or_path", None) or data.base_model or None
    data.base_model = str(base_model) if base_model else None  # PEFT writes '' for a model built from a config
    tags = {t for t in data.tags or [] if not t.endswith(":")} | set(TAGS)
    tags |= {f"base_model:adapter:{base_model}"} if base_model else set()
    data.tags = sorted(tags | ({"kohya", "stable-diffusion"} if kohya else set()))
    body = card_text(config, rank=rank, sweep=sweep, command=command, training=training, files=files, kohya=kohya,
                     resize=resize)
    return write_text(path, f"---\n{data.to_yaml()}\n---\n\n{body}")
