"""Files written whole or not at all, and adapter files read with one-line errors.

Everything dylora writes goes through `atomic_path`: the content is written under a temporary name beside
the target and renamed into place, so a reader (or a crash) never sees half a file or half a directory.
Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def replace_dir(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`, replacing an existing `dst` (moved aside first, then removed)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, overwrite: bool = True,
                fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file (or, with `directory`, a directory) into;
    rename it into place when the block succeeds, remove it when it fails."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        tmp.chmod(0o755)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)  # mkstemp makes 0600; dylora's files are plain shared data
    try:
        yield tmp
        if fsync and not directory:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if directory:
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise


def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """A temporary directory beside `path`, renamed to `path` when the block succeeds."""
    return atomic_path(path, directory=True, overwrite=overwrite)


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | os.PathLike, payload: Any, fsync: bool = False, **kwargs: Any) -> Path:
    kwargs.setdefault("indent", 2)
    return write_text(path, json.dumps(payload, **kwargs), fsync=fsync)


def read_json(path: Path, what: str = "adapter file") -> Any:
    """The parsed JSON file, or a one-line error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupted {what} {path}: {err}") from None


def read_weights(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file, or a one-line error naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"missing adapter file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupted adapter file {path}: {str(err).splitlines()[0]}") from None
