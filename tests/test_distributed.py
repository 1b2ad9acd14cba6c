"""Distributed training, resume after SIGKILL, atomic checkpoints, FSDP and torch.compile (issue #4).

The CLI runs as a user would run it: `torchrun --nproc_per_node 2 -m dylora train ...` on CPU (gloo), and
`python -m dylora train ...` killed with SIGKILL after a checkpoint, then `--resume`d; the recipe runs share one
torchrun launch, a script calling the CLI's `main` once per recipe (a launch is mostly start-up). Every process of
a run records the rank of each training forward under $DYLORA_RANK_TRACE (`tests/rank_trace.py`, plugged in with
$DYLORA_CALLBACKS).
Tiny random BERT, 200 polarity examples, at most 20 steps: the whole file takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import randomise_lora, tiny_bert
from rank_trace import _tensor_digest
from safetensors.torch import load_file
from tiny import make_tiny_model

import dylora
from dylora import DyLoraConfig, RankSampler
from dylora.app.checkpoint import MANIFEST, RANKS, newest_complete, verify
from dylora.training import step_rank

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TESTS = str(Path(__file__).parent)
TRACE = {"DYLORA_CALLBACKS": "rank_trace:RankTraceCallback",
         "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}
RUN_FILES = {"adapter", "sweep.json", "sweep.csv", "sweep.png", "run.json", "README.md"}
# --r-max is --r: torchrun's own parser would take `--r` as an ambiguous abbreviation of its options.
COMMON = ["--data", "polarity", "--r-max", "4", "--max-train", "200", "--max-length", "32", "--quiet"]
PAPER = ["--recipe", "paper"]  # one sampled rank a step: the rank sequence these tests follow
SAMPLER = RankSampler(1, 4, seed=0)  # the CLI's defaults: r_min 1, uniform, seed 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model("bert", tmp_path_factory.mktemp("models") / "tiny-bert"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dylora_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "dylora", "train", *map(str, args)]


def run_cli(cmd: list[str], trace: Path | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, **TRACE, "DYLORA_RANK_TRACE": str(trace)} if trace else ENV
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_trace(path: Path) -> dict:
    return json.loads(path.read_text())


def ranks_by_step(forwards: list[list]) -> dict[int, list[int]]:
    """{optimizer step: [rank of each micro-batch forward]}."""
    steps: dict[int, list[int]] = defaultdict(list)
    for step, b, *_ in forwards:
        steps[step].append(b)
    return dict(steps)


def file_digests(adapter_file: Path) -> dict[str, str]:
    """sha256 of each saved tensor, keyed by the parameter name it came from (PEFT drops the adapter name)."""
    return {k: _tensor_digest(t) for k, t in load_file(str(adapter_file)).items()}


def saved_name(param_name: str) -> str:
    return param_name.replace(".modules_to_save.default", "").replace(".default", "")


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


# ---------------------------------------------------------------- 1, 2: torchrun with 2 processes (DDP, gloo)


@pytest.fixture(scope="module")
def ddp_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    out, trace = root / "run", root / "trace"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "--tee", "3", "-m", "dylora", "train", "--model", tiny, *COMMON, *PAPER, "--max-steps", "12",
           "--grad-accum", "2", "--batch-size", "4", "--save-steps", "6", "--keep-checkpoints", "--out", str(out)]
    t0 = time.perf_counter()
    proc = run_cli(cmd, trace)
    return out, trace, proc, time.perf_counter() - t0


def test_ddp_every_process_uses_the_same_rank_at_every_step(ddp_run):
    out, trace, _, _ = ddp_run
    traces = [read_trace(trace / f"ranks-{i}.json") for i in (0, 1)]
    assert [t["rank"] for t in traces] == [0, 1] and all(t["world_size"] == 2 for t in traces)
    expected = [SAMPLER.sample(step) for step in range(12)]
    assert len(set(expected)) > 1  # the test would be vacuous with one rank
    for t in traces:
        steps = ranks_by_step(t["forwards"])
        assert sorted(steps) == list(range(12))
        assert [steps[s][0] for s in range(12)] == expected
    assert [f[:2] for f in traces[0]["forwards"]] == [f[:2] for f in traces[1]["forwards"]]
    # ... while each process trained on its own share of the data
    assert not {f[2] for f in traces[0]["forwards"]} & {f[2] for f in traces[1]["forwards"]}
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 12
    assert [tuple(x) for x in run["rank_history"]] == list(enumerate(expected))


def test_ddp_rank_is_fixed_within_each_gradient_accumulation_group(ddp_run):
    _, trace, _, _ = ddp_run
    for i in (0, 1):
        for step, ranks in ranks_by_step(read_trace(trace / f"ranks-{i}.json")["forwards"]).items():
            assert len(ranks) == 2 and len(set(ranks)) == 1, f"process {i}, step {step}: micro-batch ranks {ranks}"


def test_ddp_replicas_agree_and_the_saved_adapter_is_the_trained_one(ddp_run):
    out, trace, _, _ = ddp_run
    w0, w1 = (read_trace(trace / f"ranks-{i}.json")["weights"] for i in (0, 1))
    assert w0 == w1  # DDP kept the replicas identical
    saved = file_digests(out / "adapter" / "adapter_model.safetensors")
    assert {saved_name(n): d for n, d in w0.items()} == saved
    # the last Trainer checkpoint holds the same weights as the published adapter
    last = adapter_tensors(out / "checkpoints" / "checkpoint-12")
    for key, t in adapter_tensors(out / "adapter").items():
        assert torch.equal(t, last[key]), key


def test_ddp_saved_adapter_gives_the_sweep_numbers(ddp_run):
    from dylora.app.run import sweep_run

    out, _, _, _ = ddp_run
    rows, _, _ = sweep_run(out, [1, 4], progress=False)  # both bases, as the run swept them
    sweep = {row["rank"]: row for row in json.loads((out / "sweep.json").read_text())["rows"]}
    assert [(row.rank, row.basis, row.metrics["accuracy"]) for row in rows] == [
        (b, basis, sweep[b][f"{basis}_test_accuracy"]) for b in (1, 4) for basis in ("prefix", "svd")]


def test_ddp_only_process_0_writes_the_run(ddp_run):
    out, trace, proc, _ = ddp_run
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[default0]:") and "wrote" in line for line in lines)
    assert not any(line.startswith("[default1]:") and ("wrote" in line or "best rank" in line) for line in lines)
    assert {p.name for p in out.iterdir()} == RUN_FILES | {"checkpoints"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["run", "trace"]  # no .partial or .old-* left
    # each process wrote its RNG state into the checkpoint before process 0 sealed it with the manifest
    for step in (6, 12):
        ckpt = out / "checkpoints" / f"checkpoint-{step}"
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", RANKS} <= set(files)
        assert verify(ckpt) is None


RECIPES = {"default-rowwise-distill": [], "sandwich": ["--recipe", "sandwich"]}
RUNS_SCRIPT = """
import json, os, sys
from dylora.app.cli import main
for trace, args in json.loads(sys.argv[1]):  # one `dylora` command line after another, in this process
    os.environ["DYLORA_RANK_TRACE"] = trace
    code = main(args)
    if code:
        sys.exit(code)
"""


@pytest.fixture(scope="module")
def recipe_runs(tiny, tmp_path_factory):
    """`dylora train` with each recipe under one torchrun launch of 2 processes (a launch is mostly start-up)."""
    root = tmp_path_factory.mktemp("recipes")
    script = root / "runs.py"
    script.write_text(RUNS_SCRIPT)
    runs = {name: (root / name / "run", root / name / "trace") for name in RECIPES}
    specs = [[str(trace), ["train", "--model", tiny, *COMMON, *RECIPES[name], "--max-steps", "4", "--batch-size", "4",
                           "--out", str(out)]] for name, (out, trace) in runs.items()]
    run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             str(script), json.dumps(specs)], root / "unused")
    return runs


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_process_runs_the_same_passes_of_a_recipe_step(recipe_runs, recipe):
    """Each pass of a step (r then the rowwise ranks; r, r_min and a drawn rank) has the same rank scale in both
    processes, a pure function of (seed, step), while each process trains on its own rows."""
    out, trace = recipe_runs[recipe]
    sandwich = recipe == "sandwich"
    traces = [read_trace(trace / f"ranks-{i}.json") for i in (0, 1)]
    passes = [[(step, scale) for step, _, _, scale in t["forwards"]] for t in traces]
    assert passes[0] == passes[1] and len(passes[0]) == 4 * (3 if sandwich else 2)
    assert len({scale for _, scale in passes[0]}) > 2  # different ranks (and rank vectors) from pass to pass
    assert not {f[2] for f in traces[0]["forwards"]} & {f[2] for f in traces[1]["forwards"]}
    assert traces[0]["weights"] == traces[1]["weights"]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["recipe"], settings["distill"]) == (("sandwich", True) if sandwich else ("rowwise", True))


def test_prepare_out_only_process_0_creates_or_deletes_the_partial_dir(tmp_path):
    from dylora.app.run import prepare_out

    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    assert prepare_out(out, False, False, main_process=False) == partial and not partial.exists()
    partial.mkdir()
    (partial / "keep").write_text("x")
    prepare_out(out, False, False, main_process=False)
    assert (partial / "keep").exists()  # process 1 never deletes process 0's directory
    prepare_out(out, False, False, main_process=True)
    assert partial.is_dir() and not (partial / "keep").exists()


# ---------------------------------------------------------------- 3, 4: SIGKILL, resume, broken checkpoints


RESUME_ARGS = [*COMMON, *PAPER, "--max-steps", "20", "--save-steps", "5", "--batch-size", "16"]  # 13 steps an epoch


@pytest.fixture(scope="module")
def resume_runs(tiny, tmp_path_factory):
    """An uninterrupted run (checkpoints kept) and, beside it, a run SIGKILLed after its first complete
    checkpoint, its newer checkpoints broken, then resumed. Both record their ranks and batches."""
    root = tmp_path_factory.mktemp("resume")
    reference, out = root / "reference", root / "run"
    ckpts = root / "run.partial" / "checkpoints"
    # the two first runs overlap: most of a tiny run is Python start-up
    ref_proc = subprocess.Popen(dylora_cmd("--model", tiny, *RESUME_ARGS, "--keep-checkpoints", "--out", reference),
                                env={**ENV, **TRACE, "DYLORA_RANK_TRACE": str(root / "reference-trace")},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(dylora_cmd("--model", tiny, *RESUME_ARGS, "--out", out), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not (ckpts / "checkpoint-5" / MANIFEST).exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no complete checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        _, err = ref_proc.communicate(timeout=600)
        assert ref_proc.returncode == 0, err[-5000:]
    finally:
        for p in (proc, ref_proc):
            p.kill()
            p.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and verify(ckpts / "checkpoint-5") is None
    left = sorted(p.name for p in ckpts.iterdir())
    # What a later kill could have left: checkpoint-10 written but not sealed (killed during the save) and
    # checkpoint-15 with a truncated file. Taken from the reference run, then broken.
    for step in (10, 15):
        shutil.rmtree(ckpts / f"checkpoint-{step}", ignore_errors=True)
        shutil.copytree(reference / "checkpoints" / f"checkpoint-{step}", ckpts / f"checkpoint-{step}")
    (ckpts / "checkpoint-10" / MANIFEST).unlink()
    weights = ckpts / "checkpoint-15" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    resumed = run_cli(dylora_cmd("--model", tiny, *RESUME_ARGS, "--out", out, "--resume"), root / "trace")
    return reference, out, root, resumed, left


@pytest.fixture(scope="module")
def reference(resume_runs):
    return resume_runs[0]


@pytest.fixture(scope="module")
def killed_and_resumed(resume_runs):
    _, out, root, resumed, left = resume_runs
    return out, root / "trace", resumed, left, root / "reference-trace"


def test_resume_after_sigkill_ends_with_the_uninterrupted_adapter(reference, killed_and_resumed):
    out = killed_and_resumed[0]
    ref, got = adapter_tensors(reference / "adapter"), adapter_tensors(out / "adapter")
    assert set(ref) == set(got)
    for key in ref:  # bit-identical: same data order, same RNG state (restored from the checkpoint), CPU
        assert torch.equal(ref[key], got[key]), key
    assert json.loads((out / "sweep.json").read_text()) == json.loads((reference / "sweep.json").read_text())


def test_resume_continues_the_same_rank_sequence(reference, killed_and_resumed):
    out, trace, _, _, ref_trace = killed_and_resumed
    expected = [SAMPLER.sample(step) for step in range(20)]
    ref_run, run = (json.loads((d / "run.json").read_text()) for d in (reference, out))
    assert [tuple(x) for x in ref_run["rank_history"]] == list(enumerate(expected))
    assert run["rank_history"] == ref_run["rank_history"] and run["steps"] == 20
    forwards = read_trace(trace / "ranks-0.json")["forwards"]
    steps = ranks_by_step(forwards)
    assert sorted(steps) == list(range(5, 20))  # this process ran only the steps after checkpoint-5
    assert {s: b[0] for s, b in steps.items()} == {s: expected[s] for s in range(5, 20)}
    # data order (group_by_length, across the epoch boundary at step 13): the same batches at the same steps
    ref_forwards = read_trace(ref_trace / "ranks-0.json")["forwards"]
    assert [f for f in ref_forwards if f[0] >= 5] == forwards
    assert len({f[2] for f in ref_forwards}) == 20
    # the loss logged at step 20 averages steps 10..19, all after the resume: identical. (The one at step 10
    # differs: the Trainer averages it over the steps since the resume only.)
    def loss_at_20(r):
        return next(e["loss"] for e in r["log_history"] if e.get("step") == 20 and "loss" in e)

    assert loss_at_20(run) == loss_at_20(ref_run)


def test_resume_skips_broken_checkpoints_with_one_line_each(killed_and_resumed):
    out, _, resumed, left, _ = killed_and_resumed
    assert "checkpoint-5" in left
    messages = [line for line in resumed.stderr.splitlines() if line.startswith("dylora: skipping checkpoint")]
    assert len(messages) == 2, resumed.stderr[-3000:]
    assert "checkpoint-15" in messages[0] and "corrupted file adapter_model.safetensors (truncated" in messages[0]
    assert "checkpoint-10" in messages[1] and "incomplete" in messages[1]
    assert not out.with_name(out.name + ".partial").exists() and {p.name for p in out.iterdir()} == RUN_FILES


def test_newest_complete_falls_back_over_real_trainer_checkpoints(reference, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", ckpts)
    assert [p.name for p in dylora.app.checkpoint.checkpoints(ckpts)] == [f"checkpoint-{s}" for s in (20, 15, 10, 5)]
    assert all(verify(p) is None for p in ckpts.iterdir())
    messages: list[str] = []
    assert newest_complete(ckpts, messages.append) == ckpts / "checkpoint-20" and messages == []

    optimizer = ckpts / "checkpoint-20" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # truncated
    (ckpts / "checkpoint-15" / MANIFEST).unlink()  # killed during the save
    state = ckpts / "checkpoint-10" / "trainer_state.json"
    data = bytearray(state.read_bytes())
    data[10] ^= 1  # same size, one bit flipped
    state.write_bytes(bytes(data))
    assert newest_complete(ckpts, messages.append) == ckpts / "checkpoint-5"
    assert len(messages) == 3 and all("\n" not in m and "falling back" in m for m in messages)
    assert f"{ckpts / 'checkpoint-20'}: corrupted file optimizer.pt (truncated:" in messages[0]
    assert f"{ckpts / 'checkpoint-15'}: incomplete (no manifest" in messages[1]
    assert f"{ckpts / 'checkpoint-10'}: corrupted file trainer_state.json (sha256 differs" in messages[2]

    (ckpts / "checkpoint-5" / "scheduler.pt").unlink()
    messages.clear()
    assert newest_complete(ckpts, messages.append) is None
    assert "missing file scheduler.pt" in messages[3] and "training from step 0" in messages[-1]
    (ckpts / "checkpoint-5" / MANIFEST).write_text("{not json")
    assert verify(ckpts / "checkpoint-5") == f"corrupted manifest {MANIFEST}"


def test_rank_history_is_saved_in_each_checkpoint(reference):
    for step in (5, 10, 15, 20):
        history = json.loads((reference / "checkpoints" / f"checkpoint-{step}" / RANKS).read_text())["history"]
        assert history == [[s, SAMPLER.sample(s)] for s in range(step)]


# ---------------------------------------------------------------- 5: FSDP (needs CUDA)

FSDP_SCRIPT = r'''
import os, sys
import torch
import torch.distributed as dist
from peft.tuners.lora.layer import LoraLayer
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig, BertForSequenceClassification
import dylora

device_type = sys.argv[1]
dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
local = int(os.environ["LOCAL_RANK"])
device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
if device_type == "cuda":
    torch.cuda.set_device(device)


def build():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    model = dylora.get_dylora_model(BertForSequenceClassification(cfg),
                                    dylora.DyLoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(device).train()


ref, sharded = build(), build()
for module in sharded.modules():
    if isinstance(module, LoraLayer):
        fully_shard(module)
fully_shard(sharded)
opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, sharded)]
sampler = dylora.RankSampler(1, 8, seed=0)
g = torch.Generator().manual_seed(0)
for step in range(6):  # the same batch on every process: the averaged gradient is the single-process one
    ids = torch.randint(0, 120, (4, 8), generator=g).to(device)
    labels = torch.randint(0, 2, (4,), generator=g).to(device)
    losses = []
    for model, opt in zip((ref, sharded), opts):
        dylora.set_rank(model, sampler.sample(step))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-4)
for (name, p), (_, q) in zip(ref.named_parameters(), sharded.named_parameters(), strict=True):
    full = q.full_tensor() if hasattr(q, "full_tensor") else q
    torch.testing.assert_close(full, p, atol=1e-5, rtol=1e-4, msg=name)
if dist.get_rank() == 0:
    print(f"FSDP OK world_size={dist.get_world_size()}")
dist.destroy_process_group()
'''


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA run of the FSDP test needs a GPU (none here); the CPU run ran")])])
def test_fsdp_training_matches_unsharded(tmp_path, device):
    """FSDP2 (`fully_shard` on each LoRA layer and the model), 2 processes: gloo on CPU, NCCL on GPUs."""
    script = tmp_path / "fsdp_check.py"
    script.write_text(FSDP_SCRIPT)
    nproc = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    proc = run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                    str(free_port()), str(script), device])
    assert f"FSDP OK world_size={nproc}" in proc.stdout


# ---------------------------------------------------------------- 6: torch.compile, one graph for every rank


def test_torch_compile_trains_over_every_rank_without_recompiling():
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()
    cfg = DyLoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS", seed=0)
    models = []
    for _ in range(2):
        base = tiny_bert()
        base.config.problem_type = "single_label_classification"  # else set by the first forward: a recompile
        model = dylora.get_dylora_model(base, cfg)
        randomise_lora(model)
        models.append(model.train())
    eager, inner = models
    compiled = torch.compile(inner, backend="aot_eager")
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    sampler = RankSampler(1, 8, seed=0)
    g = torch.Generator().manual_seed(0)
    graphs, ranks = [], []
    for step in range(16):
        ids, labels = torch.randint(1, 120, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g)
        losses = []
        for model, run, opt in ((eager, eager, opts[0]), (inner, compiled, opts[1])):
            b = step_rank(model, sampler, step)
            with dynamo.config.patch(error_on_recompile=step > 0):
                loss = run(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        ranks.append(b)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
    assert len(set(ranks)) >= 5, ranks
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], f"graphs after each step: {graphs}"
    for (name, p), (_, q) in zip(eager.named_parameters(), inner.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)
