"""Hostile input and faults: every bad value, file, signal and race is one line with its exit code, no
traceback, nothing half-written, nothing deleted that dylora did not write.

Each case runs the real CLI entry point in-process (`dylora.app.cli.main`) on a tiny random BERT and a 200-row
two-class CSV, both built once; the few that need a signal run `python -m dylora` as a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_model, refused

import dylora
from dylora import files
from dylora.app.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    tiny = make_tiny_model("bert", root / "tiny")
    rows = ["text,label"] + [f"a fine film number {i},pos" if i % 2 else f"an awful film {i},neg" for i in range(200)]
    (root / "tiny.csv").write_text("\n".join(rows) + "\n")
    return root, str(tiny), str(root / "tiny.csv")


def T(world, *extra: str, out: Path | None = None) -> list[str]:
    """`dylora train --model TINY --data tiny.csv --r 4 --max-steps 3 --quiet` plus `extra`."""
    root, tiny, csv = world
    return ["train", "--model", tiny, "--data", csv, "--r", "4", "--max-steps", "3", "--max-eval", "20", "--quiet",
            "--out", str(out or root / "out"), *extra]


def nothing_left(out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.fixture(scope="module")
def run(world):
    root, _, _ = world
    out = root / "run"
    assert main(T(world, out=out)) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


# ---------------------------------------------------------------- 1, 3, 4: bad values, refused before any side effect


@pytest.mark.parametrize(("extra", "needle"), [
    (["--r", "1000000000000"], "4096"),
    (["--r", "99999999999999999999999"], "4096"),
    (["--epochs", "inf"], "--epochs"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lora-alpha", "nan"], "lora_alpha"),
    (["--lora-dropout", "2"], "lora_dropout"),
    (["--within", "-1"], "--within"),
    (["--target-modules", "nope"], "match no module"),
    (["--warmup-ratio", "nan"], "--warmup-ratio"),
])
def test_bad_values_are_one_line_and_leave_nothing(world, capsys, extra, needle):
    out = world[0] / "bad"
    t0 = time.perf_counter()
    refused(T(world, *extra, out=out), capsys, needle=needle)
    nothing_left(out)
    assert time.perf_counter() - t0 < 30  # refused up front, not after training (a loose bound: a shared machine)


def test_lora_baseline_checks_come_first(world, capsys):
    out = world[0] / "lora"
    for extra, needle in ((["--r", "0"], "--r"), (["--target-modules", "nope"], "match no module"),
                          (["--lora-dropout", "2"], "lora-dropout")):
        args = T(world, *extra, out=out)
        args[0] = "lora"
        refused(args, capsys, needle=needle)
        nothing_left(out)


def test_a_directory_that_is_not_a_model(world, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    pickled = tmp_path / "pickled"
    shutil.copytree(world[1], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    for model, needle in ((tmp_path / "empty", "config.json"), (pickled, "safetensors")):
        args = T(world, out=tmp_path / "o")
        args[args.index("--model") + 1] = str(model)
        refused(args, capsys, needle=needle)
        nothing_left(tmp_path / "o")


def test_an_uncached_hub_id_is_refused_at_once(world, capsys, tmp_path):
    args = T(world, out=tmp_path / "o")
    args[args.index("--model") + 1] = "no-such-org/no-such-model"
    t0 = time.perf_counter()
    refused(args, capsys, needle="not in the local Hugging Face cache")
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("where", ["file-parent", "sys"])
def test_an_unwritable_out(world, capsys, tmp_path, where):
    if where == "file-parent":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "run"
    else:
        out = Path("/sys/dylora-test-run")
    refused(T(world, out=out), capsys, needle=str(out.parent))


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: too small for a run's files (mounting needs root, which CI has here)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({proc.stderr.strip() or 'mount failed'}); needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(world, capsys, full_disk):
    out = full_disk / "run"
    refused(T(world, out=out), capsys, code=1, needle="No space left on device")
    nothing_left(out)
    assert not list(full_disk.iterdir())


def test_max_length_beyond_the_models_positions_is_capped(world, tmp_path):
    out = tmp_path / "long"
    assert main(T(world, "--max-length", "1000", out=out)) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["max_length"] == 128


def test_a_csv_field_of_a_megabyte_and_three_classes_on_a_two_label_head(world, tmp_path):
    rows = ["text,label", f"{'word ' * 200_000},pos"] + [f"text {i},{('pos', 'neg', 'mid')[i % 3]}" for i in range(60)]
    (tmp_path / "big.csv").write_text("\n".join(rows) + "\n")
    args = T(world, out=tmp_path / "big")
    args[args.index("--data") + 1] = str(tmp_path / "big.csv")
    assert main(args) == 0
    assert json.loads((tmp_path / "big" / "run.json").read_text())["label_names"] == ["mid", "neg", "pos"]


def test_deeply_nested_json_and_nan_labels(world, capsys, tmp_path):
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "nan.csv").write_text("text,label\n" + "".join(f"t {i},{'nan' if i == 7 else i % 2}\n"
                                                               for i in range(40)))
    for path, needle in ((tmp_path / "deep.json", "nests"), (tmp_path / "nan.csv", "NaN")):
        args = T(world, out=tmp_path / "o")
        args[args.index("--data") + 1] = str(path)
        refused(args, capsys, needle=needle)
        nothing_left(tmp_path / "o")


def test_a_diverging_run_stops_and_publishes_nothing(world, capsys, tmp_path):
    for extra in (["--lr", "1e30"],):
        out = tmp_path / "nan"
        refused(T(world, *extra, out=out), capsys, code=3, needle="training stopped")
        nothing_left(out)


# ---------------------------------------------------------------- 2: bad files


def test_corrupted_adapter_files(run, capsys, tmp_path):
    cases = {
        "adapter_config.json": ("[1, 2]", "JSON object"),
        "dylora_config.json": ("[1, 2]", "JSON object"),
    }
    for name, (text, needle) in cases.items():
        bad = copy_run(run, tmp_path / name)
        (bad / "adapter" / name).write_text(text)
        refused(["sweep", str(bad), "--quiet"], capsys, needle=needle)
    bad = copy_run(run, tmp_path / "alpha")
    config = json.loads((bad / "adapter" / "adapter_config.json").read_text())
    (bad / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "sixteen"}))
    refused(["sweep", str(bad), "--quiet"], capsys, needle="lora_alpha")
    bad = copy_run(run, tmp_path / "trunc")
    weights = bad / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    refused(["export", str(bad), "--rank", "2", "--out", str(tmp_path / "e")], capsys, needle="corrupted")
    assert not (tmp_path / "e").exists()


def test_non_finite_weights_are_refused(run, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = copy_run(run, tmp_path)
    path = bad / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.full_like(weights[key], math.nan)
    save_file(weights, path)
    refused(["sweep", str(bad), "--quiet"], capsys, needle="non-finite")
    refused(["export", str(bad), "--rank", "2", "--out", str(tmp_path / "e")], capsys, needle="non-finite")


def test_incomplete_run_files(run, capsys, tmp_path):
    bad = copy_run(run, tmp_path / "a")
    sweep = json.loads((bad / "sweep.json").read_text())
    del sweep["best_rank"]
    (bad / "sweep.json").write_text(json.dumps(sweep))
    refused(["export", str(bad), "--rank", "best", "--out", str(tmp_path / "e")], capsys, needle="sweep.json")
    for change in ({"settings": None}, "drop", {"r": "four"}):
        bad = copy_run(run, tmp_path / f"b{len(list(tmp_path.iterdir()))}")
        record = json.loads((bad / "run.json").read_text())
        if change == "drop":
            del record["settings"]
        elif "r" in change:
            record["settings"]["r"] = "four"
        else:
            record.update(change)
        (bad / "run.json").write_text(json.dumps(record))
        refused(["sweep", str(bad), "--quiet"], capsys, needle="run.json")


@pytest.mark.parametrize(("spec", "needle"), [("²", "best, or smallest-within"),
                                              ("smallest-within=-5", "points >= 0"),
                                              ("smallest-within=x", "needs a number")])
def test_bad_rank_specs(run, capsys, tmp_path, spec, needle):
    refused(["export", str(run), "--rank", spec, "--out", str(tmp_path / "e")], capsys, needle=needle)
    assert not (tmp_path / "e").exists()


def test_a_manifest_listing_no_files_is_skipped(tmp_path):
    from dylora.app.checkpoint import MANIFEST, newest_complete, verify, write_manifest

    good, empty = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    for ckpt in (good, empty):
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    write_manifest(good)
    (empty / MANIFEST).write_text(json.dumps({"files": []}))
    assert "lists no files" in verify(empty)
    assert newest_complete(tmp_path, warn=lambda _: None) == good


# ---------------------------------------------------------------- 5: signals, races, lost data


@pytest.mark.parametrize("delay", [0.05, 3.0], ids=["while-setting-up", "while-training"])
def test_ctrl_c_exits_130_with_a_message_and_publishes_nothing(world, tmp_path, delay):
    """Early Ctrl-C can land where a library swallows the KeyboardInterrupt (a weakref callback during an
    import); the CLI remembers it and stops at the next training step, so the run never goes on."""
    out = tmp_path / "interrupted"
    args = T(world, out=out)
    args[args.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "dylora", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 120
    while not out.with_name("interrupted.partial").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    nothing_left(out)


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(world, capsys, tmp_path):
    out = tmp_path / "busy"
    with files.lock(out):
        refused(T(world, out=out), capsys, needle="another dylora process")
    assert not out.exists()


def test_a_kill_between_the_two_renames_is_recovered(world, tmp_path):
    out = tmp_path / "swap"
    out.mkdir()
    (out / "run.json").write_text("{}")
    os.replace(out, tmp_path / f".swap.old-{os.getpid() + 1}")  # what a SIGKILL after the first rename leaves
    files.recover(out)
    assert (out / "run.json").read_text() == "{}" and not list(tmp_path.glob(".swap.old-*"))


def test_overwrite_never_deletes_what_dylora_did_not_write(run, capsys, tmp_path):
    from dylora.app.run import load_run

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    model, _, _, _ = load_run(run)
    with pytest.raises(FileExistsError, match="exists"):
        dylora.export_lora(model, 2, path=theirs)
    with pytest.raises(FileExistsError, match="did not write"):
        dylora.export_lora(model, 2, path=theirs, overwrite=True)
    assert (theirs / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        dylora.save(model, afile)
    assert afile.read_text() == "mine" and not list(tmp_path.glob(".afile.old-*"))
    refused(["export", str(run), "--rank", "2", "--out", str(theirs), "--overwrite"], capsys, needle="did not write")
    assert (theirs / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- 6: API


def test_config_refuses_non_finite_alpha():
    with pytest.raises(ValueError, match="lora_alpha"):
        dylora.DyLoraConfig(r=4, lora_alpha=math.nan, target_modules=["query"])


# ---------------------------------------------------------------- issue #20, items 7-13


def test_a_resume_onto_a_checkpoint_holding_a_pickle_skips_it_in_one_line(world, capsys, tmp_path):
    """rng_state.pth that torch.load(weights_only=True) refuses (a pickle of a class), with a manifest that
    matches it: the checkpoint is skipped like a corrupted one and the run resumes from the previous one."""
    from dylora.app.checkpoint import write_manifest

    done = tmp_path / "done"
    assert main(T(world, "--max-steps", "4", "--save-steps", "2", "--keep-checkpoints", out=done)) == 0
    out = tmp_path / "resumed"
    shutil.copytree(done / "checkpoints", out.with_name("resumed.partial") / "checkpoints")
    newest = out.with_name("resumed.partial") / "checkpoints" / "checkpoint-4"
    torch.save({"python": Path("/etc/passwd")}, newest / "rng_state.pth")
    write_manifest(newest)
    capsys.readouterr()
    assert main(T(world, "--max-steps", "4", "--save-steps", "2", "--resume", out=out)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    skipped = [line for line in err.splitlines() if line.startswith("dylora: skipping checkpoint")]
    assert len(skipped) == 1 and "checkpoint-4: corrupted file rng_state.pth" in skipped[0], err
    assert "weights_only" in skipped[0] and skipped[0].endswith("falling back to the previous one")
    assert json.loads((out / "run.json").read_text())["steps"] == 4


def test_readers_find_a_run_a_kill_left_moved_aside(run, capsys, tmp_path):
    """A kill between the two renames of a publish (no RENAME_EXCHANGE) leaves OUT moved aside; a reader puts
    it back when no writer holds OUT, and reads the moved-aside copy while one does."""
    from dylora.app.run import read_run

    out = copy_run(run, tmp_path)
    aside = tmp_path / f".{out.name}.old-{os.getpid() + 1}"
    os.replace(out, aside)
    with files.lock(out):  # a live writer: nothing is moved under it
        assert read_run(out).adapter == aside / "adapter" and not out.exists()
    capsys.readouterr()
    assert main(["sweep", str(out), "--ranks", "2", "--quiet"]) == 0
    assert (out / "run.json").is_file() and not aside.exists()
    os.replace(out, aside)
    assert main(["export", str(out), "--rank", "2", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "adapter_config.json").is_file() and out.is_dir() and not aside.exists()


@pytest.mark.parametrize(("extra", "needles"), [
    (["--lora-alpha", "1e38"], ["no update reached the adapter in 3 steps", "--lora-alpha (it is 1e+38"]),
    (["--lr", "1e-9", "--max-steps", "60"], ["stayed at chance (0.52 >= 0.97 x 0.75 ln 2)", "lr is too small",
                                             "--lr 1e-4 or larger"]),
    (["--lr", "1e-9", "--max-steps", "60", "--lora-first", "0.9"], ["stayed at chance (0.69 >= 0.97 ln 2)"]),
], ids=["alpha-1e38", "lr-1e-9", "lr-1e-9-lora-first"])
def test_the_guard_stops_runs_that_cannot_learn(world, capsys, tmp_path, extra, needles):
    """lora_alpha 1e38: the gradient norm overflows, clipping leaves every update 0, lora_B stays 0 (loss flat,
    50% accuracy). lr 1e-9 for 60 steps: the rowwise+distill loss sits at 0.75 ln 2 = 0.52, never ln 2; with
    --lora-first 0.9 the first 54 steps are plain LoRA, at ln 2 = 0.69 (each logged loss is judged at its step's
    chance level)."""
    out = tmp_path / "stuck"
    err = refused(T(world, *extra, out=out), capsys, code=3, needle="training stopped")
    assert all(n in err for n in needles), err
    nothing_left(out)


def test_the_guard_reads_the_gradient_norm_and_the_recipes_chance_level(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dylora.guard import TrainingGuard, chance_weight
    from dylora.recipes import Recipe
    from dylora.sampler import RankSampler

    def recipe(name: str, distill: bool) -> Recipe:
        return Recipe(RankSampler(1, 4), name, 1, distill, 0.5)

    assert chance_weight(recipe("rowwise", True)) == 0.75 and chance_weight(recipe("rowwise", False)) == 1
    assert chance_weight(recipe("sandwich", True)) == pytest.approx(2 / 3)  # r, r_min, one between; two distilled
    assert chance_weight(recipe("paper", False)) == 1
    thinned = Recipe(RankSampler(1, 4), "rowwise", 1, True, 0.5, 4)  # one step in 4 distilled: (0.75 + 3) / 4
    assert chance_weight(thinned) == pytest.approx(0.9375)
    # LoRA first for 8 of 10 steps: a plain pass (ln K at chance) up to step 7, then rowwise with distillation
    first = Recipe(RankSampler(1, 4), "rowwise", distill=True, lora_first=0.8, total_steps=10)
    assert [chance_weight(first, step) for step in (0, 7, 8, 9)] == [1, 1, 0.75, 0.75]
    assert chance_weight(first) == 0.75
    thinned_first = Recipe(RankSampler(1, 4), "rowwise", distill=True, distill_every=3, lora_first=0.5, total_steps=10)
    assert chance_weight(thinned_first, 5) == pytest.approx((0.75 + 2) / 3)  # step 6 taught, steps 5 and 7 not
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[], use_cpu=True)
    guard, control = TrainingGuard(num_classes=2, window=2, min_steps=0), TrainerControl()
    guard.recipe = Recipe(RankSampler(1, 4), "rowwise", distill=True, lora_first=0.5, total_steps=100)
    for step in (20, 30, 60):  # 0.6: under ln 2 in the LoRA phase, over 0.75 ln 2 = 0.52 after the switch (step 50)
        guard.on_log(args, TrainerState(global_step=step, max_steps=100), control, logs={"loss": 0.6})
        assert not control.should_training_stop, step  # a window that still holds a LoRA-phase loss under ln 2
    guard.on_log(args, TrainerState(global_step=70, max_steps=100), control, logs={"loss": 0.6})
    assert control.should_training_stop and "stayed at chance (0.60 >= 0.97 x 0.75 ln 2)" in guard.reason
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=[], use_cpu=True)
    guard, control = TrainingGuard(num_classes=2), TrainerControl()
    guard.on_log(args, TrainerState(global_step=10, max_steps=100), control, logs={"loss": 0.6, "grad_norm": 3.0})
    assert not control.should_training_stop
    guard.on_log(args, TrainerState(global_step=20, max_steps=100), control,
                 logs={"loss": 0.6, "grad_norm": math.inf})
    assert control.should_training_stop and guard.reason.startswith("the gradient norm is inf at step 20")


def test_allocate_refusals_leave_the_run_as_it_was(run, capsys, tmp_path):
    out = copy_run(run, tmp_path)
    for value in ("0", "-1"):
        t0 = time.perf_counter()
        refused(["allocate", str(out), "--budget", "2", "--method", "greedy", "--calibration", value, "--quiet"],
                capsys, needle="--calibration")
        assert time.perf_counter() - t0 < 10  # before any model is loaded
    (out / "allocation.json").write_text('{"before": true}')
    refused(["allocate", str(out), "--budget", "0", "--allow-off", "--quiet", "--export", str(tmp_path / "e")],
            capsys, needle="every layer is at rank 0")
    assert json.loads((out / "allocation.json").read_text()) == {"before": True}
    assert not (out / "allocation.png").exists() and not (tmp_path / "e").exists()


def test_hostile_run_files_are_one_line(run, capsys, tmp_path):
    bad = copy_run(run, tmp_path / "rows")
    sweep = json.loads((bad / "sweep.json").read_text())
    (bad / "sweep.json").write_text(json.dumps({**sweep, "rows": ["1", "2"]}))
    refused(["export", str(bad), "--rank", "best", "--out", str(tmp_path / "e")], capsys, needle="row that is a str")
    deep = "[" * 100_000 + "]" * 100_000
    for name, command in (("sweep.json", ["sweep"]), ("adapter/adapter_config.json", ["sweep"]),
                          ("adapter/adapter_config.json", ["export", "--rank", "2", "--out", str(tmp_path / "e")])):
        bad = copy_run(run, tmp_path / f"deep{len(list(tmp_path.iterdir()))}")
        (bad / name).write_text(deep)
        args = [command[0], str(bad), *command[1:]] + (["--quiet"] if command[0] == "sweep" else [])
        refused(args, capsys, needle="nests too deeply")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- issue 29: nothing silently lost


def tree(*roots: Path) -> dict[str, bytes | None]:
    """Every path under `roots` (hidden ones included) with its bytes (None for a directory)."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("fault", "code", "needle"), [
    (OSError(28, os.strerror(28)), 1, "[Errno 28] No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted; nothing was published"),
], ids=["disk-full-at-the-card", "ctrl-c-at-the-card"])
def test_export_publishes_the_adapter_with_its_card_or_nothing(run, capsys, tmp_path, monkeypatch, fault, code,
                                                               needle):
    """The card was written after the rename: a full disk there gave exit 1 with the adapter published without
    its card, Ctrl-C there "nothing was published" with the output in place."""
    import dylora.cards as cards

    def fail(*args, **kwargs):
        raise fault

    before = tree(run)
    monkeypatch.setattr(cards, "write_text", fail)
    refused(["export", str(run), "--rank", "2", "--out", str(tmp_path / "e")], capsys, code=code, needle=needle)
    assert not list(tmp_path.iterdir()) and tree(run) == before  # no output, no hidden temporary


def test_export_onto_a_full_disk_is_one_errno_28_line(run, capsys, tmp_path, monkeypatch):
    """safetensors raises SafetensorError (not an OSError) on a full disk: it was a traceback. Simulated by
    patching its save_file to fail as it does on a full disk (the tiny run's weights fit any small tmpfs)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    import transformers.modeling_utils

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # the name transformers imported
    for fmt in ("peft", "kohya", "merge"):  # merge: transformers' save_pretrained meets the SafetensorError
        args = ["export", str(run), "--rank", "2", "--out", str(tmp_path / "e")]
        args += ["--merge"] if fmt == "merge" else ["--format", fmt]
        if fmt == "kohya":  # a BERT has no kohya naming: the refusal comes first, still one line
            refused(args, capsys, needle="kohya")
        else:
            refused(args, capsys, code=1, needle="[Errno 28] No space left on device")
        assert not list(tmp_path.iterdir())


def test_export_of_a_run_whose_sweep_rows_lack_params_or_rank(run, capsys, tmp_path):
    """Rows without params: a traceback after the output was published. Now the card leaves the column out;
    a row without its rank is refused in one line before anything is written."""
    bad = copy_run(run, tmp_path / "noparams")
    sweep = json.loads((bad / "sweep.json").read_text())
    (bad / "sweep.json").write_text(json.dumps({**sweep, "rows": [{k: v for k, v in row.items() if k != "params"}
                                                                  for row in sweep["rows"]]}))
    capsys.readouterr()
    assert main(["export", str(bad), "--rank", "2", "--out", str(tmp_path / "e")]) == 0
    assert "## Rank sweep" in (tmp_path / "e" / "README.md").read_text()
    bad = copy_run(run, tmp_path / "norank")
    (bad / "sweep.json").write_text(json.dumps({**sweep, "rows": [{k: v for k, v in row.items() if k != "rank"}
                                                                  for row in sweep["rows"]]}))
    before = tree(bad)
    refused(["export", str(bad), "--rank", "2", "--out", str(tmp_path / "f")], capsys, needle="a row has no rank")
    assert not (tmp_path / "f").exists() and tree(bad) == before


def test_distill_every_is_bounded_and_the_guards_weight_is_in_closed_form(world, capsys, tmp_path):
    """`--distill-every 1e21` hung (> 300 s): the guard summed over range(distill_every)."""
    from dylora.guard import chance_weight
    from dylora.recipes import Recipe
    from dylora.sampler import RankSampler

    for k in (10**6, 10**21):  # first a k the old sum took seconds over (it would not end for 1e21)
        t0 = time.perf_counter()
        weight = chance_weight(Recipe(RankSampler(1, 4), "rowwise", 1, True, 0.5, k))
        assert weight == pytest.approx((0.75 + k - 1) / k) and time.perf_counter() - t0 < 1
    for value in ("1" + "0" * 21, "100000000"):
        t0 = time.perf_counter()
        refused(T(world, "--distill-every", value, out=tmp_path / "o"), capsys,
                needle="distill_every must be an integer in [1, 1000000]")
        assert time.perf_counter() - t0 < 30
        nothing_left(tmp_path / "o")


def test_a_run_the_guard_stopped_leaves_no_partial_and_a_resumed_run_at_chance_stops_too(world, capsys, tmp_path):
    """With --save-steps the stopped run kept OUT.partial (docs/errors.md: none is kept); a --resume of a run at
    chance published it with exit 0 (the guard saw only the steps after the checkpoint)."""
    stuck = ["--lr", "1e-9", "--max-steps", "60", "--save-steps", "20"]
    out = tmp_path / "stuck"
    refused(T(world, *stuck, out=out), capsys, code=3, needle="stayed at chance")
    nothing_left(out)
    done = tmp_path / "done"
    assert main(T(world, *stuck, "--no-guard", "--keep-checkpoints", out=done)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(done / "checkpoints", tmp_path / "resumed.partial" / "checkpoints")
    refused(T(world, *stuck, "--resume", out=resumed), capsys, code=3, needle="stayed at chance")
    nothing_left(resumed)


def test_the_guard_judges_a_resumed_runs_history(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dylora.guard import TrainingGuard

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-9, report_to=[], use_cpu=True)
    history = [{"loss": 0.7, "learning_rate": 1e-9, "grad_norm": 0.1, "step": s} for s in range(10, 70, 10)]
    guard, control = TrainingGuard(num_classes=2), TrainerControl()
    guard.on_train_begin(args, TrainerState(global_step=60, max_steps=60, log_history=history), control)
    assert control.should_training_stop and guard.cause.step == 50 and guard.cause.lr_too_small  # as it came
    fresh, control = TrainingGuard(num_classes=2), TrainerControl()
    fresh.on_train_begin(args, TrainerState(global_step=0, max_steps=60), control)
    assert not control.should_training_stop and fresh.cause is None
