"""The classification task: labelled texts, a sequence-classification head, accuracy (and macro F1).

A task plug-in of `dylora.app.run` (the `dylora.app.tasks.Task` contract): it loads the data, builds the base
model, encodes and collates the splits, and scores the model at its current rank on a split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import data as data_mod
from .. import report, zoo
from ..settings import Settings


class ClassificationTask:
    """Sentence (or sentence-pair) classification on a registry dataset or a local file."""

    task_type = "SEQ_CLS"
    higher_is_better = True
    progress = False  # progress bars while evaluating
    default_max_length = 64
    default_model = "minilm"

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.data: data_mod.TaskData | None = None
        self.encoded: Any = None
        self.tokenizer: Any = None

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def num_labels(self) -> int:
        return self.data.num_labels

    @property
    def metrics(self) -> list[str]:
        return self.data.metrics if self.data else list(data_mod.METRICS)

    def load_data(self) -> None:
        """The seeded splits; with `max_eval`, validation and test cut to their first max_eval rows."""
        s = self.s
        self.data = data_mod.load_task(s.data, text_column=s.text_column, label_column=s.label_column,
                                       text_pair_column=s.text_pair_column, seed=s.seed, max_train=s.max_train)
        if s.max_eval is not None:
            for split in ("validation", "test"):
                rows = self.data.splits[split]
                self.data.splits[split] = rows.select(range(min(s.max_eval, len(rows))))

    def check_model(self, model_dir: str) -> None:
        """Any model with a sequence-classification head will do."""

    def load_base(self, model_dir: str, num_labels: int | None = None) -> tuple[Any, Any]:
        """The sequence-classification model (a new head of `num_labels`, default the data's) and its tokenizer."""
        from transformers import AutoModelForSequenceClassification, set_seed

        self.tokenizer = zoo.load_tokenizer(model_dir)
        set_seed(self.s.seed)
        model = AutoModelForSequenceClassification.from_pretrained(  # a new head: the checkpoint's may differ
            model_dir, num_labels=num_labels or self.data.num_labels, ignore_mismatched_sizes=True,
            **zoo.load_kwargs(**self.s.quantization()))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model, self.tokenizer

    def saved_num_labels(self, adapter: Path, record: dict[str, Any] | None) -> int:
        """The head size of a saved run (its label names) or adapter (its saved head weights)."""
        if record and record.get("label_names"):
            return len(record["label_names"])
        from ...files import ADAPTER_WEIGHTS, read_weights

        weights = read_weights(adapter / ADAPTER_WEIGHTS)
        heads = [t.shape[0] for k, t in weights.items()
                 if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
        return heads[0] if heads else 2

    def encode(self, max_length: int) -> dict[str, Any]:
        pair = "text_pair" in self.data.splits["train"].column_names

        def enc(batch: dict[str, list]) -> dict[str, list]:
            args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
            return self.tokenizer(*args, truncation=True, max_length=max_length)

        cols = [c for c in self.data.splits["train"].column_names if c != "label"]
        self.encoded = self.data.splits.map(enc, batched=True, remove_columns=cols, desc="tokenize")
        return self.encoded

    def collator(self) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    example_scores = True  # evaluate(..., examples=True) gives per-example losses (the paired basis pick)

    @torch.no_grad()
    def evaluate(self, model: Any, split: str, examples: bool = False) -> dict[str, Any]:
        """Predict a split and score it (batches of similar length, so little padding); with `examples`, also each
        example's cross-entropy ("example_loss") and correctness ("example_correct"), in the split's order."""
        was_training = model.training
        model.eval()
        collate = self.collator()
        rows = self.encoded[split].to_list()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        preds = torch.empty(len(rows), dtype=torch.long)
        labels = torch.empty(len(rows), dtype=torch.long)
        losses = torch.empty(len(rows), dtype=torch.float64)
        device = next(model.parameters()).device
        batch_size = self.s.eval_batch_size
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([rows[i] for i in idx])
            labels[idx] = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            preds[idx] = logits.argmax(-1)
            losses[idx] = torch.nn.functional.cross_entropy(logits, labels[idx], reduction="none").double()
        model.train(was_training)
        scores: dict[str, Any] = data_mod.compute_metrics(self.metrics, preds.numpy(), labels.numpy())
        if examples:
            scores.update(example_loss=losses.tolist(), example_correct=(preds == labels).double().tolist())
        return scores

    @torch.no_grad()
    def calibration_loss(self, model: Any, n_rows: int) -> float:
        """Mean cross-entropy on the first `n_rows` validation rows, at the model's current ranks."""
        rows = self.encoded["validation"].select(range(min(n_rows, len(self.encoded["validation"]))))
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in self.collator()(rows.to_list()).items()}
        labels = batch.pop("labels")
        return float(torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels))

    def plot(self, path: Path, validation: list, test: list, title: str) -> None:
        metric = self.metrics[0]
        report.plot_sweep(path, validation, test, [([metric], metric.replace("_", " ") + " (%)")], title)

    def outputs(self, best_rank: int) -> dict[str, Any]:
        """No files beyond the common ones."""
        return {}

    def record(self) -> dict[str, Any]:
        return {"label_names": self.data.label_names, "metrics": self.metrics,
                "train_examples": len(self.encoded["train"])}
