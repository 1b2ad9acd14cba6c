"""What one training step of the re-basis recipes costs against a LoRA r = 8 step, paired in one process: MiniLM,
query+value, r = 8, batch 16 x 64 tokens of polarity, AdamW, one optimizer step each.

    python benchmarks/rebasis_cost.py     # writes benchmarks/results/rebasis_cost.json (--arms A,B --out F)

Arms, timed in interleaved rounds (each round: every arm for STEPS steps, the order rotating), the ratio of each
round's time to the same round's LoRA time, median over rounds:
- lora: PEFT LoRA r = 8, one pass;
- rowwise: one pass, a rank per row;
- rowwise-rebasis10: rowwise, and `dylora.rebasis.rebasis` (optimizer state reset) after every 10th step, its cost
  spread over the steps;
- rowwise-distill: a pass at r_max, then the rowwise pass learning from it (dylora train's recipe after its LoRA
  phase);
- rowwise-distill-f125, rowwise-distill-f25: the r_max pass on 1/8 or 1/4 of the rows (`distill_fraction`);
- rowwise-top50, rowwise-top75: one rowwise pass with half or three quarters of the rows at r_max (`top_share`).
`--arms lora,rowwise-top75` times a subset (lora always among them); `--out` names the file.
"LoRA first" costs f x 1 + (1 - f) x the recipe after it: its figures are computed from these ratios.
On a shared machine the ratios are indicative only: the load average at the start and end is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

B, L, ROUNDS, STEPS, EVERY = 16, 64, 7, 10, 10
SETTINGS = {  # arm: its DyLoraConfig settings (None: PEFT LoRA)
    "lora": None, "rowwise": {}, "rowwise-rebasis10": {}, "rowwise-distill": dict(distill=True),
    "rowwise-distill-f125": dict(distill=True, distill_fraction=0.125),
    "rowwise-distill-f25": dict(distill=True, distill_fraction=0.25),
    "rowwise-top50": dict(top_share=0.5),
    "rowwise-top75": dict(top_share=0.75),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(SETTINGS), help="comma-separated arms (lora is always timed)")
    parser.add_argument("--out", default="benchmarks/results/rebasis_cost.json")
    args = parser.parse_args(argv)
    named = args.arms.split(",")
    unknown = [a for a in named if a not in SETTINGS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(SETTINGS)}")
    arms = ("lora", *[a for a in SETTINGS if a != "lora" and a in named])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import dylora
    from dylora.app import data, zoo
    from dylora.rebasis import rebasis
    from dylora.recipes import Recipe
    from dylora.training import dylora_loss

    model_dir = zoo.resolve_model("minilm")
    tok = zoo.load_tokenizer(model_dir)
    texts = data.load_task("polarity").splits["train"]["text"][:B]
    batch = dict(tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt"))
    batch["labels"] = torch.arange(B) % 2
    common = dict(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")

    def build(arm: str):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        if arm == "lora":
            model = get_peft_model(base, LoraConfig(**common))
            recipe = None
        else:
            cfg = dylora.DyLoraConfig(**common, recipe="rowwise", **SETTINGS[arm])
            model = dylora.get_dylora_model(base, cfg)
            recipe = Recipe.from_config(cfg)
        model.train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), recipe

    built = {arm: build(arm) for arm in arms}
    steps = dict.fromkeys(arms, 0)

    def step(arm: str) -> None:
        model, opt, recipe = built[arm]
        if recipe is None:
            loss = model(**batch).loss
        else:
            loss, _ = dylora_loss(model, batch, steps[arm], recipe)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps[arm] += 1
        if arm == "rowwise-rebasis10" and steps[arm] % EVERY == 0:
            rebasis(model, opt, "reset")

    load0 = os.getloadavg()[0]
    for arm in arms:  # warm-up
        for _ in range(2):
            step(arm)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for i in range(ROUNDS):
        order = arms[i % len(arms):] + arms[:i % len(arms)]
        for arm in order:
            t = time.perf_counter()
            for _ in range(STEPS):
                step(arm)
            times[arm].append(time.perf_counter() - t)
    ratio = {arm: statistics.median(a / lo for a, lo in zip(times[arm], times["lora"], strict=True))
             for arm in arms if arm != "lora"}
    derived = {f"lora-first f={f} then {arm}": f + (1 - f) * ratio[arm]
               for f, arm in ((0.5, "rowwise"), (0.8, "rowwise-distill")) if arm in ratio}
    result = {"what": __doc__.split("\n")[0], "batch": B, "length": L, "rounds": ROUNDS, "steps_per_round": STEPS,
              "round_s": times, "ratio_median": ratio, "derived": derived, "torch_threads": torch.get_num_threads(),
              "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("ratio_median", "derived", "load_start", "load_end")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
