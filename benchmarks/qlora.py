"""QDyLoRA vs QLoRA: training memory and step time of DyLoRA and PEFT LoRA at the same r, side by side.

For each base precision (fp32, bf16, 8-bit, 4-bit nf4 + double quantization) and each arm (PEFT LoRA, DyLoRA
with the paper's recipe, rowwise, and the default rowwise + distill), one fresh process loads the base, adds the
adapter and trains `--steps` steps (after `--warmup`) on a fixed random batch through the HF Trainer (the arms'
own trainers). It reports:
- memory: on CPU the process's RSS after the model is loaded, the loading peak (VmHWM), and the peak during the
  steps alone (VmHWM reset through /proc/self/clear_refs after loading); on a GPU torch.cuda.max_memory_allocated;
- time: the median step time. Arms run in the order LoRA, DyLoRA..., LoRA, DyLoRA... (`--repeats`), so machine
  drift hits all alike; the ratio DyLoRA / LoRA is the ratio of the medians over repeats.

    python benchmarks/qlora.py [--models smollm2] [--precisions fp32,bf16,8bit,4bit] [--steps 6]
    python benchmarks/qlora.py --models llama-1b --precisions fp32,4bit --arms lora,dylora-rowwise,dylora-default \
        --steps 2 --warmup 1 --repeats 1 --batch 1          # the ~1B config (minutes an arm on a CPU)
    python benchmarks/qlora.py --models tiny --steps 2   # the CPU test's quick version

Numbers go to benchmarks/results/qlora.json (`--out`). `benchmarks/gpu.py` runs the same worker on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = {  # arm -> (method, recipe, distill)
    "lora": ("lora", None, False),
    "dylora-paper": ("dylora", "paper", False),
    "dylora-rowwise": ("dylora", "rowwise", False),
    "dylora-default": ("dylora", "rowwise", True),
}
PRECISIONS = ("fp32", "bf16", "8bit", "4bit")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape, random weights
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- the worker (one arm, one process)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak read is the steps' own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def model_dir(model: str, root: Path) -> str:
    """A directory with the base model's weights: smollm2 from its registry package, or a random Llama."""
    if model == "smollm2":
        from dylora.app import zoo

        return zoo.resolve_model("smollm2")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / model
    if not (path / "config.json").exists():
        shape = LLAMA_1B if model == "llama-1b" else TINY
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **shape)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)  # half the disk; loaded in its precision
    return str(path)


def load(path: str, precision: str, device: str):
    """The base at `precision`: 4bit / 8bit as `dylora train --quantize` loads it (`zoo.load_kwargs`: nf4 + double
    quantization, float32 compute on a CPU, bfloat16 on CUDA), then PEFT's k-bit preparation as for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from dylora.app import zoo

    if precision in ("4bit", "8bit"):
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(path, **zoo.load_kwargs(precision))
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    dtype = torch.bfloat16 if device == "cuda" or precision == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                **({"device_map": {"": 0}} if device == "cuda" else {}))


def worker(spec: dict) -> dict:
    """Load, adapt, train `warmup + steps` steps; the arm's memory and step times."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import dylora

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    model = load(spec["path"], spec["precision"], spec["device"])
    loaded = {"rss_loaded": _status("VmRSS"), "rss_load_peak": _status("VmHWM")}
    method, recipe, distill = ARMS[spec["arm"]]
    common = dict(r=spec["r"], lora_alpha=2 * spec["r"], target_modules=TARGETS, task_type="CAUSAL_LM")
    if method == "lora":
        model, trainer_cls = get_peft_model(model, LoraConfig(**common)), Trainer
    else:
        config = dylora.DyLoraConfig(**common, recipe=recipe, distill=distill)
        model, trainer_cls = dylora.get_dylora_model(model, config), dylora.DyLoraTrainer
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (spec["batch"], spec["seq"]), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    times: list[float] = []

    class Clock(TrainerCallback):
        """Step times: CUDA events on a GPU, the wall clock on a CPU; the peak memory from the first timed step.
        On a CPU one more step, untimed, runs under `PeakTensorMemory` (benchmarks/step_time.py): the peak of live
        tensor bytes, an allocator-independent figure beside the RSS."""

        tensors = None

        def on_step_begin(self, args, state, control, **kwargs):
            if not cuda and state.global_step == spec["warmup"] + spec["steps"]:
                from step_time import PeakTensorMemory

                self.tensors = PeakTensorMemory()
                self.tensors.__enter__()
                return
            if state.global_step == spec["warmup"]:
                torch.cuda.reset_peak_memory_stats() if cuda else _reset_peak()
            if cuda:
                self.start = torch.cuda.Event(enable_timing=True)
                self.start.record()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.tensors is not None:
                self.tensors.__exit__(None, None, None)
                out_extra["tensor_peak_bytes"] = self.tensors.peak
                self.tensors = None
                return
            if state.global_step <= spec["warmup"]:
                return
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                end.synchronize()
                times.append(self.start.elapsed_time(end) / 1000)
            else:
                times.append(time.perf_counter() - self.t0)

    out_extra: dict = {}
    extra_step = 0 if cuda else 1
    args = TrainingArguments(output_dir=spec["tmp"], max_steps=spec["warmup"] + spec["steps"] + extra_step,
                             learning_rate=1e-4,
                             per_device_train_batch_size=spec["batch"], report_to=[], save_strategy="no",
                             disable_tqdm=True, logging_steps=10_000, use_cpu=not cuda, seed=0,
                             bf16=cuda or spec["precision"] == "bf16", dataloader_pin_memory=False)
    trainer_cls(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    out = {**spec, **loaded, **out_extra, "step_s": statistics.median(times), "step_times": times,
           "tokens_per_s": spec["batch"] * spec["seq"] / statistics.median(times)}
    if cuda:
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu_name"] = torch.cuda.get_device_name()
    else:
        out["rss_steps_peak"] = _status("VmHWM")
    return out


# ---------------------------------------------------------------- the driver


def run_arm(spec: dict) -> dict:
    """One arm in a fresh process (its memory is its own), its result read back as JSON."""
    with tempfile.TemporaryDirectory(prefix="dylora-qlora-") as tmp:
        spec = {**spec, "tmp": tmp}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    if proc.returncode != 0:
        raise RuntimeError(f"arm {spec['arm']} ({spec['model']}, {spec['precision']}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: list[dict]) -> list[dict]:
    """Per (model, precision, r, seq, arm): median step time and memory over repeats, and the ratios to LoRA."""
    keys = sorted({(r["model"], r["precision"], r["r"], r["seq"]) for r in results}, key=str)
    rows = []
    for key in keys:
        group = [r for r in results if (r["model"], r["precision"], r["r"], r["seq"]) == key]
        by_arm = {arm: [r for r in group if r["arm"] == arm] for arm in dict.fromkeys(r["arm"] for r in group)}
        med = {arm: {m: statistics.median(r[m] for r in runs) for m in runs[0]
                     if m in ("step_s", "tokens_per_s", "rss_loaded", "rss_load_peak", "rss_steps_peak",
                              "gpu_peak_bytes", "tensor_peak_bytes")}
               for arm, runs in by_arm.items()}
        memory = "gpu_peak_bytes" if "gpu_peak_bytes" in med.get("lora", {}) else "rss_steps_peak"
        for arm, values in med.items():
            row = {"model": key[0], "precision": key[1], "r": key[2], "seq": key[3], "arm": arm, **values,
                   "repeats": len(by_arm[arm])}
            if "lora" in med:
                row["time_ratio"] = values["step_s"] / med["lora"]["step_s"]
                row["memory_ratio"] = values[memory] / med["lora"][memory]
                if "tensor_peak_bytes" in values and "tensor_peak_bytes" in med["lora"]:
                    row["tensor_ratio"] = values["tensor_peak_bytes"] / med["lora"]["tensor_peak_bytes"]
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    gpu = any("gpu_peak_bytes" in r for r in rows)
    head = ("| model | precision | r | seq | arm | step (s) | tokens/s | "
            + ("GPU peak (MB) |" if gpu else "RSS loaded (MB) | load peak (MB) | steps peak (MB) | step tensors (MB) |")
            + " time / LoRA | memory / LoRA |" + ("" if gpu else " tensors / LoRA |"))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mb = {k: f"{r[k] / 2**20:.0f}" for k in ("gpu_peak_bytes", "rss_loaded", "rss_load_peak", "rss_steps_peak",
                                                  "tensor_peak_bytes") if k in r}
        rss = f"{mb['rss_loaded']} | {mb['rss_load_peak']} | {mb['rss_steps_peak']}" if not gpu else ""
        tensor_mb = f"{r['tensor_peak_bytes'] / 2**20:.1f}" if "tensor_peak_bytes" in r else "-"
        mem = f"{mb['gpu_peak_bytes']} |" if gpu else f"{rss} | {tensor_mb} |"
        tensors = "" if gpu else f" {r['tensor_ratio']:.3f} |" if "tensor_ratio" in r else " - |"
        lines.append(f"| {r['model']} | {r['precision']} | {r['r']} | {r['seq']} | {r['arm']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {mem} {r.get('time_ratio', 1):.3f} | {r.get('memory_ratio', 1):.3f} |"
                     + tensors)
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, device: str = "cpu", default_out: str = "benchmarks/results/qlora.json",
         defaults: dict | None = None) -> list[dict]:
    d = {"models": "smollm2", "precisions": ",".join(PRECISIONS), "arms": ",".join(ARMS), "r": "8",
         "seq": "64", "batch": 2, "steps": 6, "warmup": 2, "repeats": 2, **(defaults or {})}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", default=d["models"], help="smollm2, llama-1b (random, TinyLlama's shape), tiny")
    p.add_argument("--precisions", default=d["precisions"], help=f"comma-separated: {', '.join(PRECISIONS)}")
    p.add_argument("--arms", default=d["arms"], help=f"comma-separated: {', '.join(ARMS)}")
    p.add_argument("--r", default=d["r"], help="comma-separated ranks (r_max for DyLoRA)")
    p.add_argument("--seq", default=d["seq"], help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=d["batch"])
    p.add_argument("--steps", type=int, default=d["steps"], help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--repeats", type=int, default=d["repeats"], help="runs of each arm, interleaved")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=default_out)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    from tqdm import tqdm

    unknown = [x for x in args.precisions.split(",") if x not in PRECISIONS] + \
              [x for x in args.arms.split(",") if x not in ARMS]
    if unknown:
        p.error(f"unknown precision or arm {unknown[0]!r}: precisions {', '.join(PRECISIONS)}; arms {', '.join(ARMS)}")
    root = Path(tempfile.gettempdir()) / "dylora-qlora-models"
    specs = []
    for model in args.models.split(","):
        path = model_dir(model, root)
        for precision in args.precisions.split(","):
            for r in map(int, args.r.split(",")):
                for seq in map(int, args.seq.split(",")):
                    for _ in range(args.repeats):
                        specs += [dict(model=model, path=path, precision=precision, arm=arm, r=r, seq=seq,
                                       batch=args.batch, steps=args.steps, warmup=args.warmup, threads=args.threads,
                                       device=device) for arm in args.arms.split(",")]
    results = [run_arm(spec) for spec in tqdm(specs, desc="arms", unit="arm")]
    rows = summarise(results)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "runs": results, "table": text, "device": device, "machine": platform.machine(),
               "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)
    return rows


if __name__ == "__main__":
    main()
