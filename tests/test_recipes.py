"""Training recipes (issue #11): sandwich, in-place distillation, a rank per example, the expected scale,
rsLoRA's alpha/sqrt(b), the recipe Trainer and the training guard."""

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_lora, tiny_bert, tiny_gpt2, tiny_llama
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import dylora
from dylora import DyLoraConfig, RankSampler
from dylora.app.run import stop_reason
from dylora.functional import expected_scale, scale_table
from dylora.guard import TrainingGuard
from dylora.model import dylora_adapters, set_example_ranks, set_expected_scale
from dylora.recipes import RANK_KEY, RANKS_KEY, Recipe
from dylora.training import DyLoraCallback, DyLoraTrainer, RecipeCallback, distill_kl, dylora_loss


def bert_model(r=8, **kw):
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=r, lora_alpha=16, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS", **kw))
    randomise_lora(model, std=0.1)
    return model


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 120, (n, 7), generator=g), "labels": torch.randint(0, 2, (n,), generator=g)}


# ---------------------------------------------------------------- sandwich and distillation


@pytest.mark.parametrize("distill", [False, True])
def test_sandwich_loss_and_gradients_are_the_sum_over_its_ranks(distill):
    """L = L_rmax + sum_{b < r_max} [(1 - w) L_b + w KL(p_rmax || p_b)] (w = 0 without distillation)."""
    model = bert_model().train()
    recipe = Recipe(RankSampler(1, 8, seed=3), "sandwich", sandwich_k=2, distill=distill, distill_weight=0.3)
    inputs = batch()
    loss, _ = dylora_loss(model, inputs, step=5, recipe=recipe)
    loss.backward()
    got = lora_grads(model)

    model.zero_grad()
    ranks = RankSampler(1, 8, seed=3).sandwich_ranks(5, 2)
    assert ranks[:2] == [8, 1] and len(ranks) == 4
    total, teacher = 0.0, None
    for b in ranks:
        dylora.set_rank(model, b)
        out = model(**inputs)
        if teacher is None:
            teacher, term = out.logits.detach(), out.loss
        elif distill:
            p_t, p_s = teacher.softmax(-1), out.logits.softmax(-1)
            kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
            term = 0.7 * out.loss + 0.3 * kl
        else:
            term = out.loss
        term.backward()
        total += term.detach()
    torch.testing.assert_close(loss.detach(), total)
    want = lora_grads(model)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rowwise_distill_is_a_pass_at_r_max_then_a_rowwise_pass_that_learns_from_it():
    """L = L_rmax + (1 - w) L_rows + w KL(p_rmax || p_rows), row j of the second pass at rank b_j."""
    model = bert_model().train()
    recipe = Recipe(RankSampler(1, 8, seed=3), "rowwise", distill=True, distill_weight=0.3)
    inputs = batch(n=8)
    loss, _ = dylora_loss(model, inputs, step=2, recipe=recipe)
    loss.backward()
    got = lora_grads(model)

    model.zero_grad()
    dylora.set_rank(model, 8)
    top = model(**inputs)
    teacher = top.logits.detach()
    ranks = [int(b) for b in RankSampler(1, 8, seed=3).example_ranks(8, 2)]
    assert sorted(ranks) == list(range(1, 9))  # stratified: every rank in the step
    set_example_ranks(model, ranks)
    rows = model(**inputs)
    assert_distilled(model, loss, got, top.loss, teacher, rows.loss, rows.logits)


def assert_distilled(model, loss, got, top_loss, teacher, rows_loss, student):
    """`loss` and the gradients `got` are those of L_r + 0.7 L_rows + 0.3 KL(p_teacher || p_student) (w = 0.3)."""
    p_t, p_s = teacher.softmax(-1), student.softmax(-1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    want_loss = top_loss + 0.7 * rows_loss + 0.3 * kl
    want_loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss.detach())
    want = lora_grads(model)
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rowwise_distill_every_k_teaches_on_every_kth_step_and_is_plain_rowwise_between():
    """distill_every = k: steps 0, k, 2k, ... are rowwise + distill (r_max pass, then the rowwise pass learning from
    it); every other step is the rowwise pass alone, with the task loss only, at the same stratified ranks."""
    sampler = RankSampler(1, 8, seed=3)
    thinned = Recipe(sampler, "rowwise", distill=True, distill_every=3)
    every = Recipe(sampler, "rowwise", distill=True)
    plain = Recipe(sampler, "rowwise")
    for step in range(7):
        want = every if step % 3 == 0 else plain
        assert thinned.passes(step, 8) == want.passes(step, 8), step
    assert sum(len(thinned.passes(step, 8)) for step in range(30)) == 30 + 10  # 1 + 1/k passes a step
    model, inputs = bert_model().train(), batch(n=8)
    for step, want in ((3, every), (4, plain)):
        got, _ = dylora_loss(model, inputs, step=step, recipe=thinned)
        torch.testing.assert_close(got, dylora_loss(model, inputs, step=step, recipe=want)[0])


def test_rowwise_distill_fraction_teaches_on_a_random_fraction_of_the_rows():
    """distill_fraction f: the r_max pass runs on the rows S (round(f n) of them, drawn anew each step), and
    L = L_rmax(S) + (1 - w) L_rows + w KL(p_rmax || p_rows) on S, each term a mean over its own rows."""
    sampler = RankSampler(1, 8, seed=3)
    recipe = Recipe(sampler, "rowwise", distill=True, distill_weight=0.3, distill_fraction=0.25)
    full = Recipe(sampler, "rowwise", distill=True, distill_weight=0.3)
    subsets = [recipe.passes(step, 16)[0].subset for step in range(6)]
    assert all(len(s) == 4 and list(s) == sorted(set(s)) for s in subsets)
    assert len(set(subsets)) == 6  # drawn anew each step, a pure function of (seed, step):
    assert subsets == [Recipe(sampler, "rowwise", distill=True, distill_fraction=0.25).passes(step, 16)[0].subset
                       for step in range(6)]
    assert [p.ranks for p in recipe.passes(2, 16)] == [p.ranks for p in full.passes(2, 16)]  # the same ranks
    assert recipe.passes(0, 3)[0].subset is not None and len(recipe.passes(0, 3)[0].subset) == 1  # at least a row

    model, inputs = bert_model().train(), batch(n=8)
    loss, _ = dylora_loss(model, inputs, step=2, recipe=recipe)
    loss.backward()
    got = lora_grads(model)
    model.zero_grad()
    rows = list(recipe.passes(2, 8)[0].subset)
    assert len(rows) == 2
    dylora.set_rank(model, 8)
    top = model(**{k: v[rows] for k, v in inputs.items()})
    set_example_ranks(model, [int(b) for b in sampler.example_ranks(8, 2)])
    mixed = model(**inputs)
    assert_distilled(model, loss, got, top.loss, top.logits.detach(), mixed.loss, mixed.logits[rows])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_fraction_teacher_in_the_trainer_is_a_mean_over_its_rows_items(tmp_path, family):
    """In DyLoraTrainer the r_max pass on the rows S is the mean loss over S's items, whether the model's loss is a
    batch mean (BERT's classifier) or a sum over the batch's tokens / num_items_in_batch (a causal LM: it is scaled to
    S's share), and the KL on S a mean over S's positions: (1 - w) L_rows + w KL(p_rmax || p_rows) on S."""
    kw = dict(recipe="rowwise", distill=True, distill_weight=0.4, distill_fraction=0.5, seed=2)
    if family == "bert":
        model, data, r = bert_model(**kw), toy_dataset(n=6), 8
    else:
        cfg = DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kw)
        model, data, r = dylora.get_dylora_model(tiny_llama(), cfg), lm_dataset(n=6), 4
        randomise_lora(model, std=0.1)
    seen = []

    class Recording(DyLoraTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append((self._pass, {k: v.clone() for k, v in inputs.items()}, out.detach(), num_items_in_batch))
            return out

    Recording(model=model, args=targs(tmp_path, 1, 6, 1, learning_rate=0.0), train_dataset=data).train()
    (top_pass, inputs, top_loss, items), (rows_pass, _, rows_loss, _) = seen
    assert top_pass.subset is not None and rows_pass.distill and (items is not None or family == "bert")
    rows = list(top_pass.subset)
    assert len(rows) == 3
    sub = {k: v[rows] for k, v in inputs.items()}
    with torch.no_grad():
        dylora.set_rank(model, r)
        top = model(**sub)  # the model's own loss: a mean over S's rows or tokens
        torch.testing.assert_close(top_loss, top.loss)
        set_example_ranks(model, list(rows_pass.ranks))
        mixed = model(**inputs)
        kl = distill_kl(mixed.logits[rows], top.logits, sub["labels"], shift=family == "llama")
        torch.testing.assert_close(rows_loss, 0.6 * mixed.loss + 0.4 * kl)


def test_distillation_term_is_zero_when_student_and_teacher_agree():
    logits = torch.randn(5, 3)
    assert distill_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    lm = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 5, 6], [1, 2, 3, 4, -100, -100]])
    assert distill_kl(lm, lm, labels, shift=True).item() == pytest.approx(0.0, abs=1e-7)
    assert distill_kl(lm + 1.0, lm, labels, shift=True).item() == pytest.approx(0.0, abs=1e-6)  # same softmax
    assert distill_kl(torch.randn(5, 3), logits).item() > 0


def test_causal_distillation_compares_the_positions_that_predict_a_label():
    """Logits at t predict token t + 1: only positions with labels[t + 1] != -100 count."""
    student, teacher = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 7, -100, 2]])  # predicted from positions 0 and 2
    per_pos = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(distill_kl(student, teacher, labels, shift=True), (per_pos[0, 0] + per_pos[0, 2]) / 2)
    torch.testing.assert_close(distill_kl(student, teacher, labels, shift=True, denominator=4),
                               (per_pos[0, 0] + per_pos[0, 2]) / 4)


def test_sandwich_and_example_ranks_are_a_pure_function_of_seed_and_step():
    s = RankSampler(1, 8, seed=7)
    first = [(s.sandwich_ranks(t, 3), s.example_ranks(16, t).tolist()) for t in range(20)]
    again = [(RankSampler(1, 8, seed=7).sandwich_ranks(t, 3), RankSampler(1, 8, seed=7).example_ranks(16, t).tolist())
             for t in range(20)]
    assert first == again
    code = ("import json; from dylora import RankSampler; s = RankSampler(1, 8, seed=7); "
            "print(json.dumps([(s.sandwich_ranks(t, 3), s.example_ranks(16, t).tolist()) for t in range(20)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [tuple(x) for x in json.loads(out.stdout)] == first
    assert len({tuple(r) for r, _ in first}) > 5  # the sampled ranks do change with the step
    assert all(r[:2] == [8, 1] and all(1 < b < 8 for b in r[2:]) for r, _ in first)
    assert RankSampler(3, 3).sandwich_ranks(0, 2) == [3] and RankSampler(3, 4).sandwich_ranks(0, 2) == [4, 3]


def test_example_ranks_are_stratified():
    """With the uniform pmf every rank gets n / (r_max - r_min + 1) rows, rounded up or down, in every step."""
    s = RankSampler(1, 8, seed=0)
    for step in range(10):
        assert np.bincount(s.example_ranks(16, step), minlength=9)[1:].tolist() == [2] * 8
        counts = np.bincount(s.example_ranks(10, step), minlength=9)[1:]
        assert set(counts.tolist()) <= {1, 2} and counts.sum() == 10
    geo = RankSampler(2, 6, "geometric", 0.3, seed=1)
    counts = np.bincount(geo.example_ranks(40, 0), minlength=7)[2:]
    assert np.all(np.abs(counts - 40 * geo.pmf()) < 1)


# ---------------------------------------------------------------- a rank per example


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_rowwise_output_row_j_equals_the_model_at_rank_b_j(family):
    """Row j of a batch at ranks (b_1 .. b_n) equals the model at rank b_j on row j alone (3-D activations,
    GPT-2's Conv1D and nn.Embedding)."""
    if family == "bert":
        base, cfg = tiny_bert(), DyLoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    elif family == "llama":
        base, cfg = tiny_llama(), DyLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    else:
        base, cfg = tiny_gpt2(), DyLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"])
    model = dylora.get_dylora_model(base, cfg).eval()
    randomise_lora(model, std=0.2)
    ranks = [1, cfg.r, 3, 2, cfg.r, 1]
    ids = torch.randint(1, 120, (len(ranks), 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with dylora.example_ranks(model, ranks):
            out = model(input_ids=ids).logits
        assert dylora.get_rank(model) == cfg.r
        for j, b in enumerate(ranks):
            with dylora.at_rank(model, b):
                torch.testing.assert_close(out[j], model(input_ids=ids[j:j + 1]).logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_rowwise_on_2d_activations_and_its_gradient():
    """nn.Linear on (batch, d): y_j = W0 x_j + c(b_j) B[:, :b_j] A[:b_j] x_j; row j trains components 1..b_j."""
    torch.manual_seed(0)
    model = dylora.get_dylora_model(torch.nn.Sequential(torch.nn.Linear(6, 5)),
                                    DyLoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    randomise_lora(model)
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 6)
    set_example_ranks(model, torch.tensor([2, 4, 1]))
    y = model(x)
    for j, b in enumerate([2, 4, 1]):
        torch.testing.assert_close(y[j], layer.base_layer(x[j]) + (8 / b) * B[:, :b] @ A[:b] @ x[j])
    y[2].sum().backward()  # row 2 at rank 1: only component 1 learns
    assert torch.count_nonzero(A.grad[1:]) == 0 and A.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match="set for 3 rows, but the batch has 2"):
        model(x[:2])
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        set_example_ranks(model, [1, 5])


def test_rowwise_refuses_frozen_mode():
    with pytest.raises(ValueError, match="frozen=") as err:
        DyLoraConfig(r=4, target_modules=["query"], recipe="rowwise", frozen=True)
    assert "\n" not in str(err.value)
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=4, target_modules=["query"], frozen=True)).train()
    with pytest.raises(ValueError, match="full mode only"):
        set_example_ranks(model, [1, 2])
    model.eval()
    set_example_ranks(model, [1, 2])  # inference is fine: frozen changes only gradients


def test_torch_compile_one_graph_for_every_rank_vector():
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()
    model = bert_model().train()
    model.base_model.model.config.problem_type = "single_label_classification"  # else set by the first forward
    compiled = torch.compile(model, backend="aot_eager")
    inputs = batch(4)
    graphs = []
    for step in range(4):
        ranks = RankSampler(1, 8, seed=0).example_ranks(4, step).tolist()
        set_example_ranks(model, ranks)
        with dynamo.config.patch(error_on_recompile=step > 0):
            out = compiled(**inputs).logits
        out.sum().backward()
        torch.testing.assert_close(out, model(**inputs).logits, atol=1e-5, rtol=1e-5)
        graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs


# ---------------------------------------------------------------- nested: the expected scale


def test_expected_scale_formula():
    """E_b[s_b][i] = sum_{b > i} P(b) c(b), written out over b."""
    for dist in ("uniform", "geometric"):
        s = RankSampler(2, 6, dist, 0.3)
        pmf = s.pmf()
        for scaling, c in (("alpha/b", lambda b: 16 / b), ("alpha/sqrt(b)", lambda b: 16 / math.sqrt(b))):
            want = [sum(pmf[b - 2] * c(b) for b in range(2, 7) if b > i) for i in range(6)]
            torch.testing.assert_close(expected_scale(pmf, 2, scale_table(6, 16, scaling)),
                                       torch.tensor(want, dtype=torch.float32))


def test_nested_forward_is_the_average_of_the_rank_b_forwards():
    """One layer is affine in the scale: f(x; E[s_b]) = sum_b P(b) f_b(x), and every component gets gradient."""
    torch.manual_seed(0)
    model = dylora.get_dylora_model(torch.nn.Sequential(torch.nn.Linear(6, 5)),
                                    DyLoraConfig(r=4, r_min=1, lora_alpha=8, target_modules=["0"],
                                                 rank_distribution="geometric", geometric_p=0.4))
    randomise_lora(model)
    x = torch.randn(3, 6)
    pmf = RankSampler.from_config(dylora_adapters(model)["default"]).pmf()
    direct = 0
    for b, p in zip(range(1, 5), pmf, strict=True):
        with dylora.at_rank(model, b):
            direct = direct + float(p) * model(x)
    set_expected_scale(model, pmf)
    out = model(x)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    A = model.base_model.model[0].lora_A["default"].weight
    assert torch.all(A.grad.abs().sum(1) > 0)


# ---------------------------------------------------------------- rsLoRA's scale


def test_sqrt_scaling_forward_and_export_are_exact_in_vanilla_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    pristine = copy.deepcopy(base)
    model = dylora.get_dylora_model(base, DyLoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                       rank_scaling="alpha/sqrt(b)"))
    randomise_lora(model)
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, 6)
    dylora.set_rank(model, 3)
    torch.testing.assert_close(model(x), layer.base_layer(x) + (16 / math.sqrt(3)) * x @ A[:3].T @ B[:, :3].T)
    dylora.export_lora(model, 3, tmp_path / "r3")
    saved = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"]) == (3, 16, True)
    vanilla = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "r3").eval()
    with torch.no_grad():
        torch.testing.assert_close(vanilla(x), model(x), atol=1e-6, rtol=1e-6)
    again = dylora.load(copy.deepcopy(pristine), tmp_path / "r3")  # an rsLoRA adapter loads with its scale
    assert dylora_adapters(again)["default"].rank_scaling == "alpha/sqrt(b)"
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"recipe": "matryoshka"}, "recipe="), ({"sandwich_k": -1}, "sandwich_k="), ({"distill": 1}, "distill="),
    ({"recipe": "paper", "distill": True}, "distill="),
    ({"recipe": "nested", "distill": True}, "distill="), ({"distill_weight": 1.5}, "distill_weight="),
    ({"rank_scaling": "alpha/r"}, "rank_scaling="), ({"recipe": "nested", "frozen": True}, "frozen="),
    ({"distill_every": 0}, "distill_every="), ({"distill_every": 2.5}, "distill_every="),
    ({"distill_every": 4}, "distill_every="), ({"recipe": "sandwich", "distill": True, "distill_every": 4},
                                                 "distill_every="),
    ({"distill_fraction": 0.0}, "distill_fraction="), ({"distill_fraction": 1.5}, "distill_fraction="),
    ({"distill_fraction": True}, "distill_fraction="), ({"distill_fraction": 0.25}, "distill_fraction="),
    ({"recipe": "sandwich", "distill": True, "distill_fraction": 0.25}, "distill_fraction="),
    ({"recipe": "sandwich", "top_share": 0.5}, "top_share="),
])
def test_invalid_recipe_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        DyLoraConfig(target_modules=["query"], **kwargs)
    assert "\n" not in str(err.value)


def test_recipe_settings_go_to_the_sidecar_and_old_sidecars_load(tmp_path):
    cfg = DyLoraConfig(r=4, target_modules=["query"], recipe="sandwich", sandwich_k=2, distill=True,
                       distill_weight=0.25, rank_scaling="alpha/sqrt(b)")
    assert "recipe" not in cfg.to_dict() and cfg.dylora_dict()["distill_weight"] == 0.25
    dylora.save(dylora.get_dylora_model(tiny_bert(), cfg), tmp_path / "a")
    assert dylora_adapters(dylora.load(tiny_bert(), tmp_path / "a"))["default"].dylora_dict() == \
        cfg.dylora_dict()
    side = tmp_path / "a" / "dylora_config.json"
    old = {k: v for k, v in json.loads(side.read_text()).items()
           if k not in ("recipe", "sandwich_k", "distill", "distill_weight", "distill_every", "distill_fraction",
                        "rank_scaling")}
    side.write_text(json.dumps(old))
    loaded = dylora_adapters(dylora.load(tiny_bert(), tmp_path / "a"))["default"]
    assert (loaded.recipe, loaded.sandwich_k, loaded.distill, loaded.distill_every, loaded.distill_fraction,
            loaded.rank_scaling) == ("paper", 1, False, 1, 1.0, "alpha/b")
    thinned = DyLoraConfig(r=4, target_modules=["query"], recipe="rowwise", distill=True, distill_every=3,
                           distill_fraction=0.125)
    dylora.save(dylora.get_dylora_model(tiny_bert(), thinned), tmp_path / "b")
    loaded = dylora_adapters(dylora.load(tiny_bert(), tmp_path / "b"))["default"]
    assert (loaded.distill_every, loaded.distill_fraction) == (3, 0.125)
    top = DyLoraConfig(r=4, target_modules=["query"], recipe="rowwise", top_share=0.75)
    dylora.save(dylora.get_dylora_model(tiny_bert(), top), tmp_path / "c")
    assert dylora_adapters(dylora.load(tiny_bert(), tmp_path / "c"))["default"].top_share == 0.75


def test_the_recipe_table_is_the_one_list_of_recipes():
    """options.RECIPES (what DyLoraConfig accepts) names the recipe classes, and options.DISTILL_RECIPES the ones
    whose passes distill; Recipe(sampler, name) is the class of that name, and refuses any other."""
    from dylora.options import DISTILL_RECIPES, RECIPES
    from dylora.recipes import RECIPE_CLASSES, Sandwich

    assert tuple(RECIPE_CLASSES) == RECIPES
    sampler = RankSampler(1, 8, seed=3)
    for name, cls in RECIPE_CLASSES.items():
        recipe = Recipe(sampler, name, 2, True, 0.3)
        assert type(recipe) is cls and recipe.name == name == cls(sampler).name
        twin = copy.deepcopy(recipe)
        assert type(twin) is cls and twin.passes(4, 6) == recipe.passes(4, 6)
        assert any(p.distill for p in recipe.passes(4, 6)) == (name in DISTILL_RECIPES)
    assert Recipe(sampler, name="sandwich", sandwich_k=2).passes(5, 6) == Sandwich(sampler, sandwich_k=2).passes(5, 6)
    with pytest.raises(ValueError, match="unknown recipe 'matryoshka': choose one of paper, sandwich, rowwise, nested"):
        Recipe(sampler, "matryoshka")
    with pytest.raises(ValueError, match="Sandwich is recipe 'sandwich', not 'paper'"):
        Sandwich(sampler, "paper")


# ---------------------------------------------------------------- the recipe Trainer


def toy_dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, 6), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 60).long().tolist()})


def lm_dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, 8), generator=g)
    labels = ids.clone()
    for j in range(n):  # a different number of target tokens per row
        labels[j, : 1 + j % 5] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def targs(tmp_path, steps, bs, accum, **kw):
    kw = {"learning_rate": 1e-2, **kw}
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=bs,
                             gradient_accumulation_steps=accum, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0, **kw)


def trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_paper_recipe_trains_exactly_as_trainer_plus_callback(tmp_path):
    models = [bert_model(seed=4) for _ in range(2)]
    Trainer(model=models[0], args=targs(tmp_path, 6, 4, 2), train_dataset=toy_dataset(),
            callbacks=[DyLoraCallback(RankSampler(1, 8, seed=4))]).train()
    trainer = DyLoraTrainer(model=models[1], args=targs(tmp_path, 6, 4, 2), train_dataset=toy_dataset())
    trainer.train()
    a, b = trained(models[0]), trained(models[1])
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r for _, r in trainer.recipe_callback.history] == [RankSampler(1, 8, seed=4).sample(s) for s in range(6)]
    assert [e[RANK_KEY] for e in trainer.state.log_history if RANK_KEY in e] == \
        [RankSampler(1, 8, seed=4).sample(s) for s in range(6)]


def test_a_sandwich_step_logs_the_mean_loss_of_its_passes(tmp_path):
    """The gradients of the passes add up; the logged loss is their mean, so it reads like one pass's loss."""
    model = bert_model(seed=5)
    data = toy_dataset(n=4)
    inputs = {"input_ids": torch.tensor(data["input_ids"]), "labels": torch.tensor(data["labels"])}
    recipe = Recipe(RankSampler(1, 8, seed=5), "sandwich", sandwich_k=1)
    model.train()
    with torch.no_grad():
        expected = []
        for b in recipe.sampler.sandwich_ranks(0, 1):
            dylora.set_rank(model, b)
            expected.append(float(model(**inputs).loss))
    trainer = DyLoraTrainer(model=model, args=targs(tmp_path, 1, 4, 1), train_dataset=data, recipe=recipe)
    trainer.train()
    logged = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert logged == pytest.approx(sum(expected) / len(expected), rel=1e-4)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sandwich_distill_with_gradient_accumulation_equals_one_big_batch(tmp_path, family):
    """Two micro-batches of 2 per step train the same weights as one batch of 4: every micro-batch of a step
    shares the step's ranks, and the distillation term is normalised as the task loss is."""
    def run(bs, accum):
        if family == "bert":
            model, data = bert_model(recipe="sandwich", distill=True, seed=1), toy_dataset()
        else:
            cfg = DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                               recipe="sandwich", distill=True, seed=1)
            model, data = dylora.get_dylora_model(tiny_llama(), cfg), lm_dataset()
            randomise_lora(model, std=0.1)
        trainer = DyLoraTrainer(model=model, args=targs(tmp_path, 3, bs, accum), train_dataset=data)
        if family == "bert":  # BERT's loss is a batch mean that ignores num_items_in_batch (as in plain Trainer)
            trainer.loss_is_scaled_for_ga = False
        seen = []
        model.register_forward_pre_hook(lambda m, a, k: seen.append(dylora.get_rank(m)), with_kwargs=True)
        trainer.train()
        return trained(model), seen, trainer

    (big, seen_big, _), (small, seen_small, trainer) = run(4, 1), run(2, 2)
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=2e-6, rtol=1e-4, msg=name)
    r_max = 8 if family == "bert" else 4
    steps = [RankSampler(1, r_max, seed=1).sandwich_ranks(s, 1) for s in range(3)]
    assert seen_big == [b for ranks in steps for b in ranks]
    assert seen_small == [b for ranks in steps for _ in range(2) for b in ranks]
    assert [e[RANKS_KEY] for e in trainer.state.log_history if RANKS_KEY in e] == steps
    assert dylora.get_rank(trainer.model) == r_max


def test_dylora_loss_in_a_trainer_of_your_own_matches_dylora_trainer(tmp_path):
    """The standalone hook (one summed loss) trains as DyLoraTrainer (one backward per pass) does."""
    recipe = Recipe(RankSampler(1, 8, seed=2), "sandwich", distill=True)

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = dylora_loss(model, inputs, self.state.global_step, recipe)
            return (loss, outputs) if return_outputs else loss

    models = [bert_model() for _ in range(2)]
    MyTrainer(model=models[0], args=targs(tmp_path, 3, 4, 1), train_dataset=toy_dataset(),
              callbacks=[RecipeCallback(recipe)]).train()
    DyLoraTrainer(model=models[1], args=targs(tmp_path, 3, 4, 1), train_dataset=toy_dataset(), recipe=recipe).train()
    mine, theirs = trained(models[0]), trained(models[1])
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=2e-6, rtol=1e-4, msg=name)
    assert dylora.get_rank(models[0]) == 8


@pytest.mark.parametrize("recipe", ["rowwise", "nested"])
def test_one_pass_recipes_train_and_end_at_r_max(tmp_path, recipe):
    model = bert_model(recipe=recipe)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    scales, eval_scales = [], []
    model.register_forward_pre_hook(lambda m, a, k: (scales if m.training else eval_scales).append(
        layer.dylora_rank_scale["default"].clone()), with_kwargs=True)
    trainer = DyLoraTrainer(model=model, args=targs(tmp_path, 4, 8, 2, eval_strategy="steps", eval_steps=2,
                                                    per_device_eval_batch_size=8),
                            train_dataset=toy_dataset(), eval_dataset=toy_dataset(8, 1))
    before = trained(model)
    trainer.train()
    assert len(scales) == 8  # one forward per micro-batch
    if recipe == "rowwise":  # both micro-batches of a step share the step's stratified ranks
        table = scale_table(8, 16)
        ranks = [RankSampler(1, 8).example_ranks(8, step) for step in range(4)]
        for i, s in enumerate(scales):
            torch.testing.assert_close(s, table[torch.as_tensor(ranks[i // 2]) - 1])
    else:
        want = expected_scale(RankSampler(1, 8).pmf(), 1, scale_table(8, 16))
        assert all(torch.equal(s, want) for s in scales)
    r_max_scale = torch.full((8,), 2.0)  # alpha / r_max on every component
    assert len(eval_scales) == 2 and all(torch.equal(s, r_max_scale) for s in eval_scales)
    assert torch.equal(layer.dylora_rank_scale["default"], r_max_scale)  # and after training
    assert any(not torch.equal(before[n], p) for n, p in trained(model).items())


# ---------------------------------------------------------------- the guard


def chance_dataset(n=16):
    """Every input identical, labels alternating: no model can beat ln 2."""
    return Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * n, "labels": [j % 2 for j in range(n)]})


def test_guard_stops_a_run_stuck_at_chance(tmp_path):
    guard = TrainingGuard(num_classes=2)
    trainer = DyLoraTrainer(model=bert_model(), args=targs(tmp_path, 200, 4, 1, warmup_steps=5),
                            train_dataset=chance_dataset(), callbacks=[guard])
    trainer.train()
    assert guard.stopped and 50 <= trainer.state.global_step < 200
    assert guard.reason.startswith("training loss stayed at chance (")
    assert "0.97 ln 2) after warm-up; try --lr 3e-3 (a third of 1e-2)" in stop_reason(guard.cause)


# logged (step, loss) of two real 200-step polarity runs at lr 3e-3 (benchmarks/recipes.py, seed 1, 10-step logs)
LEARNS_LATE = [0.694, 0.693, 0.691, 0.677, 0.626, 0.703, 0.567, 0.593, 0.525, 0.483, 0.632, 0.518, 0.514, 0.599,
               0.533, 0.557, 0.508, 0.493, 0.555, 0.4]  # LoRA r=1: 80.2% test accuracy in the end
STUCK = [0.694, 0.692, 0.687, 0.606, 0.719, 0.754, 0.703, 0.694, 0.694, 0.693, 0.694, 0.693, 0.7, 0.693, 0.693,
         0.691, 0.694, 0.694, 0.694, 0.693]  # DyLoRA, paper recipe: 50.0% at every rank


@pytest.mark.parametrize(("losses", "stop_at"), [(LEARNS_LATE, None), (STUCK, 90)])
def test_guard_judges_the_whole_window_not_its_mean(tmp_path, losses, stop_at):
    """A run whose loss starts to fall at step 50 is not stopped (the window's mean, 0.676, is still above
    0.97 ln 2 = 0.672 there); a run that never leaves ln 2 is stopped once five logged losses all sit there."""
    from transformers import TrainerControl, TrainerState

    args = targs(tmp_path, 200, 16, 1, learning_rate=3e-3, warmup_steps=0.06)
    guard, control = TrainingGuard(num_classes=2), TrainerControl()
    stopped = None
    for i, loss in enumerate(losses, 1):
        guard.on_log(args, TrainerState(global_step=10 * i, max_steps=200), control, logs={"loss": loss})
        if control.should_training_stop:
            stopped = 10 * i
            break
    assert stopped == stop_at, guard.reason


def test_guard_never_stops_a_short_run(tmp_path):
    guard = TrainingGuard(num_classes=2, window=1)
    trainer = DyLoraTrainer(model=bert_model(), args=targs(tmp_path, 3, 4, 1), train_dataset=chance_dataset(),
                            callbacks=[guard])
    trainer.train()
    assert trainer.state.global_step == 3 and guard.reason is None


def test_guard_stops_on_a_nonfinite_loss_and_flags_nonfinite_weights(tmp_path):
    from transformers import TrainerControl, TrainerState

    args = targs(tmp_path, 10, 4, 1, learning_rate=3e-3)
    guard, control, state = TrainingGuard(num_classes=2), TrainerControl(), TrainerState(global_step=2, max_steps=10)
    guard.on_log(args, state, control, logs={"loss": 0.5})
    assert not control.should_training_stop
    guard.on_log(args, state, control, logs={"loss": float("nan")})
    assert control.should_training_stop
    assert stop_reason(guard.cause) == "training loss is nan at step 2; try --lr 1e-3 (a third of 3e-3)"
    model = bert_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("inf"))
    guard = TrainingGuard()
    guard.on_train_end(args, state, TrainerControl(), model=model)
    reason = stop_reason(guard.cause)
    assert reason.startswith("1 trainable tensors are not finite (e.g. ") and "try --lr 1e-3" in reason


def test_the_guard_returns_a_cause_and_words_no_cli_option(tmp_path):
    """The core guard says what happened and the numbers (`cause`); what to try, in `dylora train`'s options, is
    the application's (`stop_reason`)."""
    from transformers import TrainerControl, TrainerState

    from dylora.guard import StopKind

    args = targs(tmp_path, 10, 4, 1, learning_rate=3e-3)
    guard = TrainingGuard(num_classes=2)
    guard.on_log(args, TrainerState(global_step=4, max_steps=10), TrainerControl(),
                 logs={"loss": 0.6, "grad_norm": math.inf, "learning_rate": 1e-3})
    cause = guard.cause
    assert (cause.kind, cause.step, cause.value, cause.lr, cause.clipped) == \
        (StopKind.GRAD_NORM_NOT_FINITE, 4, math.inf, 3e-3, True)
    assert cause.moved == pytest.approx(4e-3) and not cause.lr_too_small
    assert guard.reason == cause.what == "the gradient norm is inf at step 4, so every update is clipped to nothing"
    assert "--" not in guard.reason and "try" not in guard.reason
    assert stop_reason(cause) == f"{cause.what}; try --lr 1e-3 (a third of 3e-3)"  # no lora_alpha known here

    guard = TrainingGuard(num_classes=2, window=1, min_steps=1)
    guard.on_log(args, TrainerState(global_step=5, max_steps=10), TrainerControl(),
                 logs={"loss": 0.7, "learning_rate": 1e-6})
    assert (guard.cause.kind, guard.cause.value, guard.cause.lr_too_small) == (StopKind.AT_CHANCE, 0.7, True)
    assert stop_reason(guard.cause) == ("training loss stayed at chance (0.70 >= 0.97 ln 2) after warm-up; the lr is "
                                        "too small to move the weights (AdamW moves each by at most the lr a step: "
                                        "5e-06 in all); try --lr 1e-4 or larger")
