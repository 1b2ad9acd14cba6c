"""The allocation benchmark's SVD baseline (benchmarks/allocate.py): a trained LoRA cut to a parameter budget by
the SVD of each layer's update, (alpha / r) B A = U S V^T, keeping the largest singular values of all layers."""

import importlib.util
import sys
from pathlib import Path

import torch
from conftest import tiny_bert
from test_files import make

import dylora

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # allocate.py imports its helpers from reproduce.py
spec = importlib.util.spec_from_file_location("allocate_bench",
                                              Path(__file__).parents[1] / "benchmarks" / "allocate.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def deltas(model):
    """(alpha / r) B A of every layer, at full rank."""
    out = {}
    for name, m in bench.lora_layers(model).items():
        v = m.lora_variant["default"]
        out[name] = (v.lora_alpha / v.r) * (m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().double()
    return out


def test_full_budget_keeps_the_update_and_the_outputs():
    model = make(tiny_bert(), ["query", "value"], r=4)
    before = deltas(model)
    ids = torch.randint(0, 120, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    per_rank = sum(dylora.layer_costs(model).values())
    keep = bench.svd_allocate(model, 4 * per_rank)
    assert set(keep.values()) == {4}
    for name, d in deltas(model).items():
        torch.testing.assert_close(d, before[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_budget_keeps_the_largest_singular_values_of_all_layers():
    model = make(tiny_bert(), ["query", "value"], r=4)
    before = deltas(model)
    costs = dylora.layer_costs(model)
    budget = 2 * sum(costs.values()) + 5  # average rank 2, plus a few parameters that buy nothing
    keep = bench.svd_allocate(model, budget)
    assert sum(k * costs[name] for name, k in keep.items()) <= budget
    assert sum(keep.values()) == 2 * len(keep)  # layers of one size: exactly 2 components a layer on average
    spectra = {name: torch.linalg.svdvals(d) for name, d in before.items()}
    kept = min(float(spectra[n][k - 1]) for n, k in keep.items() if k)
    dropped = max(float(spectra[n][k]) for n, k in keep.items() if k < 4)
    assert kept >= dropped  # one global threshold
    for name, d in deltas(model).items():  # each layer is its best rank-k_l approximation
        U, S, Vh = torch.linalg.svd(before[name])
        k = keep[name]
        torch.testing.assert_close(d, U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], atol=1e-5, rtol=1e-5)
