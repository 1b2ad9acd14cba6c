"""The generation task: a causal LM writes a text from a text (`bbc-headlines`: a headline for a paragraph;
`bbc-topic`: the topic word of an article's first words).

A task plug-in of `dylora.app.run`. bbc-headlines: each rank is evaluated with greedy, batched, left-padded
decoding (KV cache on) and scored with BLEU, ROUGE-L F1 and target perplexity; the best rank is picked on BLEU.
bbc-topic: each rank is evaluated by one teacher-forced forward over prompt + reference (`teacher_forced`),
which gives the per-token NLL of the reference (topic word and EOS), its perplexity, and the exact match of greedy
decoding: greedy decoding writes exactly the reference and then EOS iff at every target position the forward's
argmax is the reference token (by induction over the positions: while the argmaxes agree, greedy decoding feeds the
model the same prefix as the forward). The best rank is picked on exact match.

Prompt format (the same token ids in training and generation)::

    [bos] "Write a short headline for this news paragraph.\\nParagraph:" " <paragraph>" "\\nHeadline:"

followed in training by " <headline>" and EOS; bbc-topic: "News:" " <first words>" "\nTopic:", then
" <topic>" and EOS (`PROMPTS`). The loss covers the headline and EOS only: prompt tokens and
padding get label -100. Each piece is tokenised on its own and the token ids are concatenated, so the prompt
is exactly the same whether or not a target follows.

Lengths: `Settings.max_length` bounds prompt + target (default 160, capped at the model's position limit;
the value used is recorded in run.json). In training the target is cut to half the budget and the paragraph
is cut so prompt + target fits; in generation the paragraph is cut so the prompt plus `max_new_tokens` fits
(keeping at least one paragraph token: `max_new_tokens` may be at most the model's positions less that prompt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...model import at_rank, dylora_adapters, get_basis, get_layer_ranks
from .. import data as data_mod
from .. import report, zoo
from ..settings import Settings

INSTRUCTION = "Write a short headline for this news paragraph.\nParagraph:"
SEPARATOR = "\nHeadline:"
GENERATION_MAX_LENGTH = 160
MAX_NEW_TOKENS = 24
METRICS = ("bleu", "rougeL", "perplexity")  # the first picks the best rank (higher is better)
# per dataset: (instruction, separator) of the prompt, and the metrics (the first picks the best rank, higher is
# better); bbc-topic's are one forward's (`teacher_forced`)
PROMPTS = {"bbc-headlines": (INSTRUCTION, SEPARATOR), "bbc-topic": ("News:", "\nTopic:")}
DATASET_METRICS = {"bbc-headlines": METRICS, "bbc-topic": ("exact_match", "nll", "perplexity")}
TEACHER_FORCED = ("bbc-topic",)  # scored by one forward, no decoding
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


def encode_prompt(tokenizer: Any, source: str, budget: int,
                  prompt: tuple[str, str] = (INSTRUCTION, SEPARATOR)) -> list[int]:
    """Token ids of the prompt (instruction, separator) for `source`, the source cut so the prompt has at most
    `budget` tokens."""
    head = _bos(tokenizer) + _ids(tokenizer, prompt[0])
    tail = _ids(tokenizer, prompt[1])
    room = max(0, budget - len(head) - len(tail))
    return head + _ids(tokenizer, " " + source.strip())[:room] + tail


def encode_example(tokenizer: Any, source: str, target: str, max_length: int,
                   prompt: tuple[str, str] = (INSTRUCTION, SEPARATOR)) -> dict[str, list[int]]:
    """input_ids = prompt + target + eos; labels = -100 on the prompt, the token ids on target + eos."""
    if tokenizer.eos_token_id is None:
        raise zoo.ModelError("the tokenizer has no eos token to end a generated text with")
    target_ids = _ids(tokenizer, " " + target.strip())[: max(1, max_length // 2)] + [tokenizer.eos_token_id]
    ids = encode_prompt(tokenizer, source, max_length - len(target_ids), prompt)
    return {"input_ids": ids + target_ids, "labels": [IGNORE] * len(ids) + target_ids}


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


def load_causal_lm(model_dir: str, model_name: str, seed: int = 0, **load_kwargs: Any) -> tuple[Any, Any]:
    """The causal LM and its tokenizer (pad token set; padding is done by this module); `load_kwargs` go to
    `from_pretrained` (`zoo.load_kwargs`: a quantized base)."""
    from transformers import AutoModelForCausalLM, set_seed

    check_causal_lm(model_dir, model_name)
    tokenizer = zoo.load_tokenizer(model_dir, for_generation=True)
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------- generation and scores


@torch.no_grad()
def generate(model: Any, tokenizer: Any, sources: Sequence[str], *, rank_b: int | None = None,
             max_new_tokens: int = MAX_NEW_TOKENS, max_length: int = GENERATION_MAX_LENGTH, batch_size: int = 16,
             progress: bool = False, desc: str = "generate", basis: str = "prefix",
             prompt: tuple[str, str] = (INSTRUCTION, SEPARATOR)) -> list[str]:
    """Greedy headlines for `sources`, batched and left-padded, with the KV cache.

    With `rank_b`, the DyLoRA rank is b (in `basis`) for the whole call (`dylora.at_rank`), restored afterwards.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("no prompts to generate from: give at least one text")
    if any(not isinstance(x, str) or not x.strip() for x in sources):
        raise ValueError("empty prompt: every text to generate from must contain some words")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    floor = len(encode_prompt(tokenizer, "", 0, prompt)) + 1  # the instruction, the separator and one paragraph token
    limit = zoo.max_positions(model.config)
    if limit and max_new_tokens > limit - floor:  # beyond the positions the model has (or forever, with RoPE)
        raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the model: it must lie in [1, {limit - floor}] "
                         f"(its context of {limit} tokens less the {floor} of the shortest prompt)")
    budget = max(floor, max_length - max_new_tokens)
    prompts = [encode_prompt(tokenizer, x, budget, prompt) for x in sources]
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
            with at_rank(model, rank_b, basis=basis):
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


@torch.no_grad()
def teacher_forced(model: Any, encoded: Any, pad_token_id: int, batch_size: int = 16,
                   examples: bool = False) -> dict[str, Any]:
    """One forward over each prompt + reference (left-padded, so the logits of the target positions are the last
    columns and only those go through the LM head): the mean NLL of the reference tokens (EOS included; nats per
    token), its perplexity, and exact match (%): the share of examples whose argmax equals the reference at every
    target position, which is exactly when greedy decoding writes the reference and then EOS. With `examples`,
    each example's summed NLL ("example_loss") and exact match (1.0 / 0.0, "example_correct") too."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = list(encoded)
    per_example, correct = [0.0] * len(rows), [False] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # batches of like lengths: less padding
    try:
        for start in range(0, len(rows), batch_size):
            index = order[start:start + batch_size]
            batch = [rows[i] for i in index]
            n = max(len(f["input_ids"]) for f in batch)
            ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for row, f in enumerate(batch):  # left padding: every example ends at the last column
                k = len(f["input_ids"])
                ids[row, n - k:] = torch.as_tensor(f["input_ids"])
                labels[row, n - k:] = torch.as_tensor(f["labels"])
                mask[row, n - k:] = 1
            # the target starts after the prompt: its predictions come from the columns before it
            keep = int((labels != IGNORE).sum(1).max()) + 1
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # as generate() numbers a left-padded prompt
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=position_ids.to(device), logits_to_keep=keep).logits[:, :-1].float()
            target = labels[:, n - keep + 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                    reduction="none")
            scored = target != IGNORE
            total += float(nll.sum())
            count += int(scored.sum())
            for i, ok, loss in zip(index, ((logits.argmax(-1) == target) | ~scored).all(1), nll.sum(1), strict=True):
                correct[i], per_example[i] = bool(ok), float(loss)
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    out: dict[str, Any] = {"exact_match": 100.0 * sum(correct) / max(len(rows), 1), "nll": mean,
                           "perplexity": math.exp(mean)}
    if examples:
        out.update(example_loss=per_example, example_correct=[float(x) for x in correct])
    return out


class GenerationTask:
    """Text-to-text generation with a decoder-only causal LM."""

    task_type = "CAUSAL_LM"
    metrics = list(METRICS)
    higher_is_better = True
    progress = False  # progress bars while evaluating
    default_max_length = GENERATION_MAX_LENGTH
    default_model = "smollm2"

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.prompt = PROMPTS.get(s.data, PROMPTS["bbc-headlines"])
        self.metrics = list(DATASET_METRICS.get(s.data, METRICS))
        self.teacher_forced = s.data in TEACHER_FORCED
        self.example_scores = self.teacher_forced  # evaluate(examples=True): per-example losses (any_rank's picks)
        self.data: data_mod.GenerationData | None = None
        self.splits: dict[str, Any] = {}
        self.encoded: dict[str, Any] = {}
        self.tokenizer: Any = None
        self.predictions: dict[str, dict[tuple[int, str], list[str]]] = {"validation": {}, "test": {}}  # (b, basis)

    @property
    def name(self) -> str:
        return self.data.name

    def load_data(self) -> None:
        s = self.s
        self.data = data_mod.load_generation_task(s.data, seed=s.seed, max_train=s.max_train)
        cap = s.max_eval or None
        self.splits = {name: split if name == "train" or cap is None else split.select(range(min(cap, len(split))))
                       for name, split in self.data.splits.items()}

    def check_model(self, model_dir: str) -> None:
        check_causal_lm(model_dir, self.s.model, self.s.data)

    def load_base(self, model_dir: str, num_labels: int | None = None) -> tuple[Any, Any]:
        model, self.tokenizer = load_causal_lm(model_dir, self.s.model, self.s.seed,
                                               **zoo.load_kwargs(**self.s.quantization()))
        return model, self.tokenizer

    def saved_num_labels(self, adapter: Path, record: dict[str, Any] | None) -> None:
        return None

    def encode(self, max_length: int) -> dict[str, Any]:
        """Token ids and prompt-masked labels of each (source, target) split."""
        self.max_length = max_length

        def enc(batch: dict[str, list]) -> dict[str, list]:
            rows = [encode_example(self.tokenizer, x, y, max_length, self.prompt)
                    for x, y in zip(batch["source"], batch["target"], strict=True)]
            return {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}

        self.encoded = {name: split.map(enc, batched=True, remove_columns=split.column_names, desc=f"tokenize {name}")
                        for name, split in self.splits.items()}
        return self.encoded

    def collator(self) -> Any:
        return CausalCollator(self.tokenizer.pad_token_id)

    def evaluate(self, model: Any, split: str, examples: bool = False) -> dict[str, Any]:
        """BLEU, ROUGE-L and perplexity of one split at the model's current rank (predictions kept); bbc-topic:
        exact match, NLL and perplexity from one forward (`teacher_forced`; with `examples`, per-example NLLs)."""
        if self.teacher_forced:
            return teacher_forced(model, self.encoded[split], self.tokenizer.pad_token_id, self.s.eval_batch_size,
                                  examples=examples)
        b = self._rank(model)
        basis = get_basis(model) if b and dylora_adapters(model) else "prefix"
        preds = generate(model, self.tokenizer, self.splits[split]["source"], max_new_tokens=MAX_NEW_TOKENS,
                         max_length=self.max_length, batch_size=self.s.eval_batch_size,
                         progress=self.progress, desc=f"{split} r={b if b is not None else 'per layer'}",
                         prompt=self.prompt)
        if b is not None:  # samples.json shows uniform ranks; a per-layer allocation is scored, not sampled
            self.predictions[split][b, basis] = preds
        scores = text_scores(preds, self.splits[split]["target"])
        scores["perplexity"] = perplexity(model, self.encoded[split], self.tokenizer.pad_token_id,
                                          self.s.eval_batch_size)
        return scores

    def _rank(self, model: Any) -> int | None:
        """The one rank every layer uses (the baselines': r, or 0 for full fine-tuning); None when the layers
        have ranks of their own (a `dylora allocate` allocation)."""
        if not dylora_adapters(model):
            return self.s.r if self.s.method == "lora" else 0
        ranks = set(get_layer_ranks(model).values())
        return ranks.pop() if len(ranks) == 1 else None

    def calibration_loss(self, model: Any, n_rows: int) -> float:
        """Mean target-token NLL on the first `n_rows` validation pairs, at the model's current ranks."""
        rows = self.encoded["validation"].select(range(min(n_rows, len(self.encoded["validation"]))))
        return math.log(perplexity(model, rows, self.tokenizer.pad_token_id, self.s.eval_batch_size))

    def plot(self, path: Path, validation: list, test: list, title: str) -> None:
        scores = ["exact_match"] if self.teacher_forced else ["bleu", "rougeL"]
        report.plot_sweep(path, validation, test, [(scores, "score (0-100)"), (["perplexity"], "target perplexity")],
                          title, params=False)

    def outputs(self, best_rank: int) -> dict[str, Any]:
        """samples.json: the first test predictions at each rank swept ("ranks"; the SVD cut's under "svd")."""
        test = self.splits["test"]

        def shown(preds: list[str]) -> list[dict[str, str]]:
            return [{"source": test[i]["source"], "reference": test[i]["target"], "prediction": preds[i]}
                    for i in range(min(N_SAMPLES, len(preds)))]

        done = sorted(self.predictions["test"].items())
        samples = {"best_rank": best_rank, "ranks": {str(b): shown(p) for (b, basis), p in done if basis == "prefix"}}
        if any(basis == "svd" for (_, basis), _ in done):
            samples["svd"] = {str(b): shown(p) for (b, basis), p in done if basis == "svd"}
        return {"samples.json": samples}

    def record(self) -> dict[str, Any]:
        return {"task": "generation", "metrics": self.metrics,
                "prompt": {"instruction": self.prompt[0], "separator": self.prompt[1]},
                "max_new_tokens": None if self.teacher_forced else MAX_NEW_TOKENS,
                "train_examples": len(self.encoded["train"]),
                "eval_examples": {k: len(self.splits[k]) for k in ("validation", "test")}}
