"""Files written whole or not at all, and adapter files read with one-line errors.

Everything dylora writes goes through `atomic_path`: the content is written under a temporary name beside
the target and renamed into place, so a reader (or a crash) never sees half a file or half a directory.
Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# What marks a directory as one dylora wrote (and may replace): a run, an adapter, a merged model.
MARKERS = ("run.json", ADAPTER_CONFIG, "config.json")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (OSError, AttributeError):
        return False


def _taken(dst: Path) -> FileExistsError:
    return FileExistsError(f"{dst} exists (another process wrote it meanwhile); pass overwrite=True to replace it")


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` in one step that fails with FileExistsError when `dst` exists (Linux renameat2
    RENAME_NOREPLACE; elsewhere a hard link for a file, a check then a rename for a directory)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0  # AT_FDCWD, RENAME_NOREPLACE
        code = 0 if done else ctypes.get_errno()
    except (OSError, AttributeError):
        done, code = False, errno.ENOSYS
    if done:
        return
    if code == errno.EEXIST:
        raise _taken(dst)
    if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise OSError(code, os.strerror(code))
    if src.is_dir():
        if dst.exists() or dst.is_symlink():
            raise _taken(dst)
        os.rename(src, dst)
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise _taken(dst) from None
    os.unlink(src)


def publish(src: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished temporary `src` (a file or a directory) to `dst`: replacing an existing `dst` only
    with `overwrite` (a directory: only one dylora wrote), else failing with FileExistsError if one appeared."""
    if not overwrite:
        _rename_noreplace(src, dst)
    elif src.is_dir():
        replace_dir(src, dst)
    else:
        os.replace(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_stale(path: Path) -> None:
    """Remove the temporaries of `path` (`.NAME.tmp-PID-*`) that a killed dylora process left: those whose
    process no longer runs. A live writer's temporaries are left alone."""
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
            m = re.match(r"(\d+)-", tmp.name[len(path.name) + 6:])
            if not m or int(m[1]) == os.getpid() or _pid_alive(int(m[1])):
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def os_error(err: Exception) -> OSError:
    """An OSError for a safetensors write error ("... (os error 28)" becomes "[Errno 28] No space left on device")."""
    m = re.search(r"os error (\d+)", str(err))
    if m:
        code = int(m[1])
        return OSError(code, os.strerror(code))
    return OSError(f"cannot write the weights: {(str(err).splitlines() or [type(err).__name__])[0]}")


def save_weights(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, its write errors (a full disk) raised as OSError (SafetensorError is not one)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        raise os_error(err) from None


def _moved_aside(path: Path) -> list[Path]:
    """The `.NAME.old-PID` copies of `path` a replacement moved aside, oldest first."""
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)


def recover(path: Path) -> None:
    """Put back a directory that a kill left moved aside (`.NAME.old-PID`) in the middle of a replacement."""
    if not path.exists():
        old = _moved_aside(path)
        if old:
            os.replace(old[-1], path)


def readable(path: str | os.PathLike) -> Path:
    """Where to read directory `path` from: itself; or, where a kill between the two renames of a replacement
    left it moved aside, put back first (as `recover`, under `lock` so no live writer is disturbed); or, while
    a writer holds it (or its parent is read-only), the moved-aside copy itself."""
    path = Path(path)
    if path.exists() or not _moved_aside(path):
        return path
    with contextlib.suppress(ValueError, OSError):  # a live writer (FileExistsError), a read-only parent
        with lock(path):
            recover(path)
    if path.exists():
        return path
    old = _moved_aside(path)
    return old[-1] if old else path


def check_replaceable(path: Path) -> None:
    """Refuse to replace a file, or a non-empty directory that dylora did not write."""
    if path.is_file() or path.is_symlink():
        raise FileExistsError(f"{path} is a file; dylora replaces only directories it wrote: choose another path")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).exists() for m in MARKERS):
        raise FileExistsError(f"{path} holds files dylora did not write ({', '.join(MARKERS)} missing); "
                              "choose another path")


def replace_dir(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`, replacing an existing `dst` in one atomic swap where the system has
    one (else moved aside, renamed, removed; `recover` undoes a kill between the two renames)."""
    recover(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    check_replaceable(dst)
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block (a `.NAME.lock` file beside it); refuse if another
    process holds it."""
    import fcntl

    lock_file = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_file, "w")  # noqa: SIM115 (closed below)
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another dylora process is writing {path}; wait for it or choose another "
                                  "path") from None
        try:
            yield
        finally:
            lock_file.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False, overwrite: bool = True,
                fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file (or, with `directory`, a directory) into;
    rename it into place when the block succeeds, remove it when it fails. Without `overwrite` the rename
    fails (FileExistsError) if `path` appeared meanwhile. Temporaries a killed process left are removed first."""
    path = Path(path)
    if directory:
        recover(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if directory:
        check_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
    clean_stale(path)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        tmp.chmod(0o755)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)  # mkstemp makes 0600; dylora's files are plain shared data
    try:
        yield tmp
        if fsync and not directory:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        publish(tmp, path, overwrite)
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
    except RecursionError:
        raise ValueError(f"corrupted {what} {path}: its JSON nests too deeply") from None


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
