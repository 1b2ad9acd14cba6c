"""Nothing silently lost where dylora writes (issue 29): `resize`, `export_kohya` and the publish step they share.

Every refusal is one line (exit 2, or 1 for an OS error) and leaves the directories involved byte-identical;
every output is complete, model card included, in a hidden temporary before one rename that never replaces a
path unless asked; the cut of a mixed-dtype adapter is written in each tensor's own dtype, never as inf.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import refused

import dylora
from dylora import DyLoraConfig, files
from dylora.app.cli import main
from dylora.resizing import resize_state_dict


class Net(torch.nn.Module):
    def __init__(self, width: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def save_lora(path: Path, r: int = 6, width: int = 12, std: float = 0.3, **kw) -> None:
    """A plain PEFT LoRA on `a` and `b` with random A and B, saved to `path`."""
    model = get_peft_model(Net(width), LoraConfig(r=r, lora_alpha=8, target_modules=["a", "b"], **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(path)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and directory under `roots` (hidden ones included) with the hash of its bytes."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# ---------------------------------------------------------------- resize never writes over its own input


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_resize_refuses_an_out_that_is_its_input_or_inside_it_even_with_overwrite(tmp_path, capsys, where):
    """`resize RUN/adapter --out RUN/adapter --overwrite` turned a run's r_max DyLoRA adapter into a rank-2 LoRA."""
    run = tmp_path / "run"
    save_lora(run / "adapter")
    (run / "run.json").write_text("{}")
    out = {"itself": run / "adapter", "inside": run / "adapter" / "small", "parent": run}[where]
    before = snapshot(tmp_path)
    refused(["resize", str(run / "adapter"), "--rank", "2", "--out", str(out), "--overwrite"], capsys,
            needle="never writes over its own input")
    assert snapshot(tmp_path) == before


def test_a_second_resize_into_one_new_out_gets_exists_at_publish(tmp_path, capsys, monkeypatch):
    """Two resizes into one new --out, the first with a slow read: the other publishes meanwhile; the first must
    not replace it (it did: both exited 0). The other resize runs inside the first's read, as a race would."""
    import dylora.resizing as resizing

    save_lora(tmp_path / "in")
    out = tmp_path / "out"
    real = resizing.read_adapter

    theirs: dict[str, str] = {}

    def slow_read(path):
        monkeypatch.setattr(resizing, "read_adapter", real)
        assert main(["resize", str(path), "--rank", "3", "--out", str(out)]) == 0  # the fast one, meanwhile
        theirs.update(snapshot(out))
        return real(path)

    monkeypatch.setattr(resizing, "read_adapter", slow_read)
    capsys.readouterr()
    code = main(["resize", str(tmp_path / "in"), "--rank", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "exists" in err and "Traceback" not in err, err
    assert theirs and snapshot(out) == theirs  # the other's output, whole and untouched
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


# ---------------------------------------------------------------- mixed dtypes: each tensor its own dtype, never inf


def mixed(path: Path, scale: float) -> None:
    """A finite adapter with fp16 lora_A (values ~1) and bf16 lora_B (values ~scale)."""
    save_lora(path, r=4)
    state = load_file(path / "adapter_model.safetensors")
    state = {k: (v.half() if "lora_A" in k else (v * scale).bfloat16()) for k, v in state.items()}
    save_file(state, path / "adapter_model.safetensors")


def test_mixed_fp16_and_bf16_factors_are_cut_in_float64_and_written_in_their_own_dtypes(tmp_path, capsys):
    """fp16 A and bf16 B ~1e9: B was cast to A's dtype, 8 of 10 tensors written as inf with exit 0."""
    mixed(tmp_path / "in", 1e9)
    config = json.loads((tmp_path / "in" / "adapter_config.json").read_text())
    state = load_file(tmp_path / "in" / "adapter_model.safetensors")
    new_config, new_state, _ = resize_state_dict(config, state, rank=2)
    assert main(["resize", str(tmp_path / "in"), "--rank", "2", "--out", str(tmp_path / "out")]) == 0
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for result in (new_state, written):
        for key, t in result.items():
            assert t.dtype == state[key].dtype and torch.isfinite(t).all(), key
    for m in ("a", "b"):
        A = state[f"base_model.model.{m}.lora_A.weight"].double()
        B = state[f"base_model.model.{m}.lora_B.weight"].double()
        u, s, vh = torch.linalg.svd((8 / 4) * B @ A)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        A2 = written[f"base_model.model.{m}.lora_A.weight"].double()
        B2 = written[f"base_model.model.{m}.lora_B.weight"].double()
        got = (new_config["lora_alpha"] / 2) * B2 @ A2
        assert torch.allclose(got, best, rtol=2e-2, atol=2e-2 * float(best.abs().max()))


def test_a_cut_that_fits_no_split_of_its_dtypes_is_refused_in_one_line(tmp_path, capsys):
    """fp16 A and B of 6e4 everywhere (finite): the r components add up in the one singular direction, so the
    rank-2 cut's factors need entries of 8.5e4, beyond fp16's 65504 in both."""
    save_lora(tmp_path / "in", r=4)
    state = load_file(tmp_path / "in" / "adapter_model.safetensors")
    weights = tmp_path / "in" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 6e4).half() for k, v in state.items()}, weights)
    before = snapshot(tmp_path)
    refused(["resize", str(tmp_path / "in"), "--rank", "2", "--out", str(tmp_path / "out")], capsys,
            needle="does not fit the adapter's dtypes")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- rank_pattern / alpha_pattern


@pytest.mark.parametrize(("name", "pattern", "needle"), [
    ("rank_pattern", {"a[": 6}, "rank_pattern key 'a['"),
    ("rank_pattern", {"a": "6"}, "rank_pattern['a'] must be an integer >= 1, got '6'"),
    ("rank_pattern", {"a": 2.5}, "rank_pattern['a'] must be an integer"),
    ("alpha_pattern", {"a": "big"}, "alpha_pattern['a'] must be a finite number, got 'big'"),
    ("alpha_pattern", {"a": math.nan}, "alpha_pattern['a'] must be a finite number, got nan"),
    ("alpha_pattern", {"(": 3}, "alpha_pattern key '('"),
], ids=["bad-regex", "rank-string", "rank-float", "alpha-string", "alpha-nan", "alpha-bad-regex"])
def test_bad_pattern_keys_and_values_are_one_line_naming_the_key(tmp_path, capsys, name, pattern, needle):
    """They gave tracebacks (re.error, TypeError, LinAlgError); a string rank gave "rank 6 ... but 6"."""
    save_lora(tmp_path / "in")
    path = tmp_path / "in" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), name: pattern}))
    before = snapshot(tmp_path)
    refused(["resize", str(tmp_path / "in"), "--rank", "2", "--out", str(tmp_path / "out")], capsys, needle=needle)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (mounting needs root). Where it cannot be mounted, the test patches safetensors' write to
    fail as on a full disk instead (`SafetensorError: ... No space left on device (os error 28)`)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    yield mnt, proc.returncode == 0
    if proc.returncode == 0:
        subprocess.run(["umount", str(mnt)], check=False)


def fill_or_patch(mounted: bool, monkeypatch) -> None:
    if mounted:
        return
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_resize_onto_a_full_disk_is_one_errno_28_line_and_leaves_nothing(tmp_path, capsys, small_disk,
                                                                           monkeypatch):
    """SafetensorError is not an OSError: it was a traceback. The adapter (256 KiB of weights) cannot fit."""
    disk, mounted = small_disk
    save_lora(tmp_path / "in", r=64, width=512, std=0.01)
    fill_or_patch(mounted, monkeypatch)
    refused(["resize", str(tmp_path / "in"), "--rank", "60", "--out", str(disk / "out")], capsys, code=1,
            needle="[Errno 28] No space left on device")
    assert not list(disk.iterdir())  # hidden temporaries included


# ---------------------------------------------------------------- hidden temporaries a kill left


def test_temporaries_a_killed_writer_left_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    save_lora(tmp_path / "in")
    stale_dir = tmp_path / f".out.tmp-{dead.pid}-x1y2"
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".out.tmp-{dead.pid}-z3.md"
    stale_file.write_text("half")
    live = tmp_path / f".out.tmp-{os.getppid()}-live"  # a writer that still runs: left alone
    live.mkdir()
    other = tmp_path / ".outer.tmp-1-x"  # another path's temporary: not ours to judge
    other.mkdir()
    dylora.resize(tmp_path / "in", tmp_path / "out", rank=2)
    assert not stale_dir.exists() and not stale_file.exists() and live.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "README.md").is_file()


# ---------------------------------------------------------------- kohya export


class Twin(torch.nn.Module):
    """Modules `a.b_c` and `a_b.c`: both are `a_b_c` once kohya turns dots into underscores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Module()
        self.a.b_c = torch.nn.Linear(5, 5)
        self.a_b = torch.nn.Module()
        self.a_b.c = torch.nn.Linear(5, 5)

    def forward(self, x):
        return self.a_b.c(self.a.b_c(x))


def twin(targets: list[str]) -> torch.nn.Module:
    return dylora.get_dylora_model(Twin(), DyLoraConfig(r=4, lora_alpha=8, target_modules=targets))


def test_kohya_names_that_collide_are_refused_in_one_line(tmp_path):
    """One of the two modules was silently dropped from the file."""
    match = "modules 'unet:a.b_c' and 'unet:a_b.c' both get the kohya name lora_unet_a_b_c"
    with pytest.raises(ValueError, match=match) as err:
        dylora.export_kohya({"unet": twin(["b_c", "c"])}, 2, tmp_path / "x.safetensors")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_kohya_export_never_replaces_a_file_it_was_not_asked_to_write(tmp_path):
    """`export_kohya(model, 2, "x/notes.safetensors", overwrite=False)` replaced an unrelated x/notes.md with its
    card; with overwrite=True a .md dylora did not write is not replaced either."""
    model = {"unet": twin(["b_c"])}
    (tmp_path / "notes.md").write_text("my notes")
    before = snapshot(tmp_path)
    for overwrite, match in ((False, "notes.md exists"), (True, "notes.md exists and is not a model card dylora")):
        with pytest.raises(FileExistsError, match=match):
            dylora.export_kohya(model, 2, tmp_path / "notes.safetensors", overwrite=overwrite)
        assert snapshot(tmp_path) == before
    path = dylora.export_kohya(model, 2, tmp_path / "style.safetensors", overwrite=False)
    assert "lora_unet_a_b_c.lora_down.weight" in load_file(path)
    assert "kohya" in (tmp_path / "style.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md", "style.md", "style.safetensors"]
    with pytest.raises(FileExistsError, match="style.safetensors exists"):
        dylora.export_kohya(model, 2, path, overwrite=False)
    dylora.export_kohya(model, 3, path, overwrite=True)  # its own card is replaced when asked
    assert "rank 3" in (tmp_path / "style.md").read_text()


def test_kohya_file_and_card_appear_together_or_not_at_all(tmp_path, monkeypatch):
    """The card was written after the file was renamed into place: a failure there left a file without card."""
    import dylora.cards as cards

    def boom(*args, **kwargs):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(cards, "write_text", boom)
    with pytest.raises(OSError, match="No space left"):
        dylora.export_kohya({"unet": twin(["b_c"])}, 2, tmp_path / "style.safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- dylora.load reads the sidecar's r and lora_alpha


@pytest.mark.parametrize("field", ["r", "lora_alpha"])
def test_load_refuses_a_sidecar_whose_r_or_lora_alpha_disagrees(tmp_path, field):
    """`dylora.load` ignored them without a word."""
    model = dylora.get_dylora_model(Net(), DyLoraConfig(r=4, lora_alpha=8, target_modules=["a"]))
    dylora.save(model, tmp_path / "ad")
    sidecar = tmp_path / "ad" / "dylora_config.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), field: 7}))
    with pytest.raises(ValueError, match=f"dylora_config.json has {field}=7 but adapter_config.json has {field}="):
        dylora.load(Net(), tmp_path / "ad")


def test_publish_without_overwrite_never_replaces_a_path_that_appeared(tmp_path):
    for directory in (False, True):
        path = tmp_path / f"p{directory}"
        with pytest.raises(FileExistsError, match="another process wrote it meanwhile"):
            with files.atomic_path(path, directory=directory, overwrite=False) as tmp:
                (tmp / "x").write_text("mine") if directory else tmp.write_text("mine")
                path.mkdir() if directory else path.write_text("theirs")
                if directory:
                    (path / "theirs").write_text("theirs")
        assert (path / "theirs" if directory else path).read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pFalse", "pTrue"]
