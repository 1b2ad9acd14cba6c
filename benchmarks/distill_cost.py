"""What one training step of the distilled rowwise recipe costs against a LoRA step, and what cheaper shapes of it
would cost (issue #19, the 1.2x target): MiniLM, r = 8, batch 16 x 40 tokens, one optimizer step each.

    python benchmarks/distill_cost.py     # writes benchmarks/results/distill_cost.json

Shapes, timed in turn (5 rounds of 5 steps each; the median round, and the spread):
- lora: one pass at r_max (what a LoRA r = 8 step costs);
- rowwise: one pass, a rank per row;
- two passes: r_max (task loss) then rowwise (today's default, rowwise + distillation);
- fused: both in one batch of 2 x 16 rows, r_max on the first 16 (per-row ranks);
- teacher without gradient: r_max forward under no_grad, then the rowwise pass.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

B, L, ROUNDS, STEPS = 16, 40, 5, 5


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification

    import dylora
    from dylora.app import zoo
    from dylora.model import set_example_ranks

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(zoo.resolve_model("minilm"), num_labels=2)
    model = dylora.get_dylora_model(base, dylora.DyLoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(1000, 20000, (B, L))
    mask = torch.ones_like(x)
    y = torch.randint(0, 2, (B,))
    rows = [1 + i % 8 for i in range(B)]

    def at_rmax():
        dylora.set_rank(model, 8)
        model(input_ids=x, attention_mask=mask, labels=y).loss.backward()

    def rowwise():
        set_example_ranks(model, rows)
        model(input_ids=x, attention_mask=mask, labels=y).loss.backward()

    def two_passes():
        at_rmax()
        rowwise()

    def fused():
        set_example_ranks(model, [8] * B + rows)
        model(input_ids=torch.cat([x, x]), attention_mask=torch.cat([mask, mask]),
              labels=torch.cat([y, y])).loss.backward()

    def teacher_no_grad():
        with torch.no_grad():
            dylora.set_rank(model, 8)
            model(input_ids=x, attention_mask=mask)
        rowwise()

    shapes = {"lora": at_rmax, "rowwise": rowwise, "two passes": two_passes, "fused": fused,
              "teacher without gradient": teacher_no_grad}
    for f in shapes.values():  # warm-up
        f()
        opt.zero_grad()
    times: dict[str, list[float]] = {k: [] for k in shapes}
    for _ in range(ROUNDS):
        for name, f in shapes.items():
            t0 = time.perf_counter()
            for _ in range(STEPS):
                f()
                opt.step()
                opt.zero_grad()
            times[name].append((time.perf_counter() - t0) / STEPS)
    lora = statistics.median(times["lora"])
    out = {"setting": f"MiniLM r=8, batch {B} x {L} tokens, {torch.get_num_threads()} threads, median of {ROUNDS} "
                      f"rounds of {STEPS} steps", "load_avg": os.getloadavg()[0],
           "shapes": {k: {"step_ms": 1000 * statistics.median(v), "ratio": statistics.median(v) / lora,
                          "spread_ms": [1000 * min(v), 1000 * max(v)]} for k, v in times.items()}}
    for k, v in out["shapes"].items():
        print(f"{k:26s} {v['step_ms']:6.0f} ms  {v['ratio']:.2f}x  ({v['spread_ms'][0]:.0f}-{v['spread_ms'][1]:.0f})")
    path = Path("benchmarks/results/distill_cost.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
