"""The distribution as a user gets it: `python -m build` and `twine check` pass; the wheel carries the PEP 639
license, `py.typed`, ranges (not pins) and the one version; installed into a fresh venv that holds the core's
dependencies only it runs the README's Python quick start on a tiny model, and with the `cli` extra's it gives a
working `dylora`.

The fresh venv is real (`python -m venv`, no system site-packages) and the wheel is installed into it by pip; its
dependencies are this environment's installed distributions, exactly the closure of the wheel's Requires-Dist,
linked into one directory on its path (so the test needs no download of torch); `pip check` then proves the
wheel's declared ranges accept them. About a minute, most of it the isolated build.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from conftest import tiny_bert
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "src/dylora/__init__.py").read_text(), re.M)[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"HF_HUB_OFFLINE": "1"}


def run(*args: object, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel built from this checkout in build's isolated environment (as a release is)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    return out


def wheel(dist: Path) -> Path:
    (found,) = dist.glob("dylora-*.whl")
    return found


def metadata(dist: Path):
    with zipfile.ZipFile(wheel(dist)) as z:
        return Parser().parsestr(z.read(f"dylora-{VERSION}.dist-info/METADATA").decode())


def test_twine_check_passes(dist):
    files = sorted(dist.iterdir())
    assert [f.name for f in files] == [f"dylora-{VERSION}-py3-none-any.whl", f"dylora-{VERSION}.tar.gz"]
    proc = run(sys.executable, "-m", "twine", "check", "--strict", *files)
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_wheel_metadata(dist):
    """PEP 639 license, the one version, py.typed and the license text inside, ranges rather than pins."""
    meta = metadata(dist)
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0" and meta["License"] is None
    assert meta.get_all("License-File") == ["LICENSE"]
    with zipfile.ZipFile(wheel(dist)) as z:
        names = set(z.namelist())
    assert "dylora/py.typed" in names and f"dylora-{VERSION}.dist-info/licenses/LICENSE" in names
    with tarfile.open(dist / f"dylora-{VERSION}.tar.gz") as tar:
        sdist = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    assert {"LICENSE", "src/dylora/py.typed", "pyproject.toml", "README.md"} <= sdist
    requires = {canonicalize_name(r.name): r for r in map(Requirement, meta.get_all("Requires-Dist"))}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "diffusers"):
        spec = requires[name].specifier
        assert spec and not any(s.operator == "==" for s in spec), f"{name} is pinned: {spec}"
    assert any(s.operator == "<" for s in requires["peft"].specifier), "peft has no upper bound"


def closure(requirements: list[Requirement], extras: set[str]) -> dict[str, md.Distribution]:
    """The installed distributions these requirements need, transitively (markers evaluated here)."""
    found: dict[str, md.Distribution] = {}
    todo = [r for r in requirements if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in found:
            continue
        found[key] = dist = md.distribution(req.name)
        wanted = {"", *req.extras}
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
    return found


def link_distributions(dists: dict[str, md.Distribution], into: Path) -> None:
    """Link each distribution's top-level files (its packages and its .dist-info) into one directory."""
    into.mkdir(parents=True, exist_ok=True)
    for dist in dists.values():
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (into / top).exists():
                (into / top).symlink_to(source)


@pytest.fixture(scope="module")
def fresh(dist, tmp_path_factory) -> tuple[Path, Path]:
    """A fresh venv (no system site-packages) with the wheel installed by pip and the core's dependencies only."""
    root = tmp_path_factory.mktemp("fresh")
    run(sys.executable, "-m", "venv", "--without-pip", root / "venv")
    python = root / "venv" / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    core = [Requirement(r) for r in metadata(dist).get_all("Requires-Dist")]
    link_distributions(closure(core, {""}), root / "core")
    (site / "core-deps.pth").write_text(f"{root / 'core'}\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel(dist))
    return root, python


QUICK_START_SETUP = """
import torch
from transformers import TrainingArguments

torch.manual_seed(0)
path = "tiny-bert"
args = TrainingArguments(output_dir="out/trainer", max_steps=3, per_device_train_batch_size=4, report_to=[],
                         save_strategy="no", use_cpu=True, logging_steps=1)
train = [{"input_ids": torch.randint(5, 120, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
          "labels": torch.tensor(i % 2)} for i in range(12)]
ids = torch.randint(5, 120, (6, 8))


def evaluate(model):
    with torch.no_grad():
        return {"logit": float(model(input_ids=ids).logits.sum())}
"""

QUICK_START_CHECK = """
import json
from pathlib import Path

assert dylora.__file__.startswith(sys.prefix), dylora.__file__  # the installed wheel, not a checkout
assert [row.rank for row in rows if row.basis == "prefix"] == list(range(1, 9)), rows
assert dylora.get_rank(model) == 8 and json.loads(Path("out/lora-r3/adapter_config.json").read_text())["r"] == 3
assert not any("lora" in name for name, _ in merged.named_parameters())
for name in ("datasets", "matplotlib", "sklearn"):  # the core only (huggingface_hub brings typer and rich)
    assert importlib.util.find_spec(name) is None, name
print("quick start ok", dylora.__version__)
"""


def readme_quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_fresh_venv_core_only_runs_the_readme_quick_start(fresh):
    root, python = fresh
    work = root / "work"
    work.mkdir()
    tiny_bert().save_pretrained(work / "tiny-bert")
    script = "import importlib.util, sys\n" + QUICK_START_SETUP + readme_quick_start() + QUICK_START_CHECK
    (work / "quick_start.py").write_text(script)
    proc = run(python, "quick_start.py", cwd=work)
    assert f"quick start ok {VERSION}" in proc.stdout
    run(sys.executable, "-m", "pip", "--python", python, "check")  # the ranges accept what is installed
    proc = run(root / "venv" / "bin" / "dylora", "--version", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("which `pip install 'dylora[cli]'` installs"), \
        proc.stderr


def test_fresh_venv_with_the_cli_extra_has_a_working_dylora(fresh, dist):
    root, python = fresh
    cli = [Requirement(r) for r in metadata(dist).get_all("Requires-Dist")]
    link_distributions(closure(cli, {"", "cli"}), root / "cli")
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "cli-deps.pth").write_text(f"{root / 'cli'}\n")
    dylora = root / "venv" / "bin" / "dylora"
    assert run(dylora, "--version").stdout.strip() == f"dylora {VERSION}"
    assert "resize" in run(dylora, "--help").stdout
    adapter = root / "adapter"
    model = tiny_bert()
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])).save_pretrained(adapter)
    proc = run(dylora, "resize", adapter, "--rank", "2", "--out", root / "r2")
    assert "wrote a plain PEFT LoRA adapter cut by SVD" in proc.stdout
    proc = run(dylora, "lora", "--recipe", "sandwich", check=False)
    assert proc.returncode == 2 and "is an option of `dylora train`" in proc.stderr
