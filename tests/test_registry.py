"""Tests for dylora.app.registry.fetch against a local simple index: pinned files only, verified before use."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from dylora.app import registry


def _one_line(exc: pytest.ExceptionInfo[ValueError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.mark.parametrize("html_page", [False, True], ids=["pep691-json", "pep503-html"])
def test_pinned_file_is_fetched_and_verified(local_index, tmp_path: Path, html_page: bool) -> None:
    data = b"wheel bytes " * 1000
    artifact = local_index.publish("Some_Project", "some_project-1.0-py3-none-any.whl", data, html_page=html_page)
    path = registry.fetch(artifact, tmp_path / "dest")
    assert path == tmp_path / "dest" / artifact.filename and path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == [artifact.filename]
    assert local_index.gets == ["/simple/some-project/", f"/files/Some_Project/{artifact.filename}"]


def test_bytes_that_miss_the_pin_are_refused_and_deleted(local_index, tmp_path: Path) -> None:
    pin = hashlib.sha256(b"the real file").hexdigest()
    artifact = local_index.publish("proj", "proj-1.0.tar.gz", b"a tampered file", pin=pin)
    with pytest.raises(registry.FetchError) as exc:
        registry.fetch(artifact, tmp_path / "dest")
    msg = _one_line(exc)
    got = hashlib.sha256(b"a tampered file").hexdigest()
    assert "proj-1.0.tar.gz" in msg and f"got {got}" in msg and f"expected {pin}" in msg
    assert list((tmp_path / "dest").iterdir()) == []


def test_file_missing_from_the_page(local_index, tmp_path: Path) -> None:
    local_index.publish("proj", "proj-1.0.tar.gz", b"x")
    with pytest.raises(ValueError) as exc:
        registry.fetch(registry.Artifact("proj", "proj-2.0.tar.gz", "0" * 64), tmp_path, error=ValueError, hint="h!")
    msg = _one_line(exc)
    assert "proj-2.0.tar.gz" in msg and local_index.url in msg and "not listed" in msg and msg.endswith("; h!")
    with pytest.raises(registry.FetchError) as exc:
        registry.fetch(registry.Artifact("absent", "absent-1.0.tar.gz", "0" * 64), tmp_path)
    assert "absent-1.0.tar.gz" in _one_line(exc) and "404" in _one_line(exc)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_index_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(registry.INDEX_ENV, f"http://127.0.0.1:{port}/simple/")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(registry.FetchError) as exc:
        registry.fetch(registry.Artifact("proj", "proj-1.0.tar.gz", "0" * 64), tmp_path)
    msg = _one_line(exc)
    assert "proj-1.0.tar.gz" in msg and f"http://127.0.0.1:{port}/simple/" in msg
    assert list(tmp_path.iterdir()) == []


def test_index_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry.INDEX_ENV, raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    assert registry.index_url() == "https://pypi.org/simple/"
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.example/simple")
    assert registry.index_url() == "https://mirror.example/simple/"
    monkeypatch.setenv(registry.INDEX_ENV, "http://local/simple/")
    assert registry.index_url() == "http://local/simple/"


def test_a_cached_directory_is_built_once_and_published_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    builds = []

    def ready(path: Path) -> bool:
        return (path / "config.json").is_file()

    def build(dest: Path) -> None:
        builds.append(dest)
        (dest / "sub").mkdir()
        (dest / "sub" / "weights").write_bytes(b"w")
        (dest / "sub" / "weights").chmod(0o600)
        (dest / "config.json").write_text("{}")

    def broken(dest: Path) -> None:
        (dest / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        registry.cached_dir("models/m", broken, ready)
    with pytest.raises(registry.FetchError, match="incomplete cache entry") as exc:
        registry.cached_dir("models/m", lambda dest: (dest / "half").write_text("x"), ready)
    _one_line(exc)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # nothing half-built is left
    path = registry.cached_dir("models/m", build, ready)
    assert path == tmp_path / "cache" / "models" / "m" and ready(path) and len(builds) == 1
    assert (path / "sub" / "weights").stat().st_mode & 0o777 == 0o644 and path.stat().st_mode & 0o777 == 0o755
    assert registry.cached_dir("models/m", build, ready) == path and len(builds) == 1  # not built again
    (path / "config.json").unlink()  # an entry that is not ready is rebuilt
    assert ready(registry.cached_dir("models/m", build, ready)) and len(builds) == 2
    assert [p.name for p in path.parent.iterdir()] == ["m"]
