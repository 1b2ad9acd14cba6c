"""Re-basis during training (`rebasis_every`) and LoRA first, nested last (`lora_first`): the rotation keeps B A and
orders the components by singular value, the optimizer state is reset or rotated, and both happen after the steps
they name."""

import json

import pytest
import torch
from conftest import randomise_lora, tiny_bert
from datasets import Dataset
from transformers import TrainingArguments

import dylora
from dylora import DyLoraConfig, RankSampler
from dylora.functional import rank_coefficient, svd_factors, svd_rebasis
from dylora.model import dylora_adapters
from dylora.rebasis import rebasis
from dylora.recipes import Recipe, RecipePass
from dylora.training import DyLoraTrainer


def bert_model(r=8, **kw):
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=r, lora_alpha=16, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS", recipe="rowwise", **kw))
    randomise_lora(model, std=0.1)
    return model


def layers(model):
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 120, (n, 7), generator=g)}


def test_svd_rebasis_keeps_the_update_and_orders_components_by_singular_value():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 20, generator=g, dtype=torch.float64), torch.randn(15, 6, generator=g, dtype=torch.float64)
    new_a, new_b, s = svd_rebasis(A, B)
    torch.testing.assert_close(new_b @ new_a, B @ A, atol=1e-12, rtol=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(B @ A)[:6], atol=1e-10, rtol=0)
    assert bool((s[:-1] >= s[1:]).all())
    # component i is u_i s_i v_i^T: A' rows orthogonal with one norm a, B' columns orthogonal with norms s_i / a
    a = float(A.norm() / 6 ** 0.5)
    torch.testing.assert_close(new_a @ new_a.T, a * a * torch.eye(6, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(new_b.norm(dim=0) * a, s, atol=1e-12, rtol=0)
    # so the prefix of the re-based factors is the SVD cut (Eckart-Young) at every rank
    for b in range(1, 7):
        a_s, b_s, _ = svd_factors(A, B, 1.0)
        torch.testing.assert_close(new_b[:, :b] @ new_a[:b], b_s[:, :b] @ a_s[:b], atol=1e-10, rtol=0)
    # B = 0 (LoRA's start): B' stays 0 and every A' row stays alive at norm a
    zero_a, zero_b, _ = svd_rebasis(A, torch.zeros_like(B))
    assert torch.count_nonzero(zero_b) == 0
    torch.testing.assert_close(zero_a.norm(dim=1), torch.full((6,), a, dtype=torch.float64))
    with pytest.raises(ValueError, match="r <= in and r <= out"):
        svd_rebasis(torch.randn(6, 4), torch.randn(15, 6))


def delta(model, b, basis="prefix"):
    with dylora.at_rank(model, b, basis=basis):
        return [layer.get_delta_weight("default").double() for layer in layers(model)]


def test_model_rebasis_keeps_the_output_and_makes_the_prefix_the_svd_cut():
    model = bert_model().eval()
    x = batch()
    with torch.no_grad():
        full = model(**x).logits
        svd3 = delta(model, 3, "svd")  # the best rank-3 approximation of c(8) B A
    assert rebasis(model) == len(layers(model)) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, full, atol=1e-5, rtol=1e-5)
        # the prefix at b = 3 is now that cut, at the prefix's own scale c(3) = alpha / 3 instead of c(8)
        for got, want in zip(delta(model, 3), svd3, strict=True):
            torch.testing.assert_close(got * rank_coefficient(8, 16) / rank_coefficient(3, 16), want, atol=1e-6,
                                       rtol=1e-4)
    for layer in layers(model):
        v = layer.lora_variant["default"]
        A, B = v.factors(layer, "default")
        s = torch.linalg.svdvals(rank_coefficient(8, 16) * B.double() @ A.double())[:8]
        norms = B.double().norm(dim=0) * A.double().norm(dim=1) * rank_coefficient(8, 16)
        torch.testing.assert_close(norms, s, atol=1e-5, rtol=1e-4)  # component i holds s_i, in order


def test_rebasis_leaves_a_layer_with_non_finite_factors_as_it_is():
    """A diverged layer has no SVD: it is left for the training guard, the finite layers are re-based."""
    model = bert_model()
    first = layers(model)[0]
    A, B = first.lora_variant["default"].factors(first, "default")
    with torch.no_grad():
        B[0, 0] = float("nan")
    before = (A.clone(), B.clone())
    assert rebasis(model) == len(layers(model)) - 1
    torch.testing.assert_close(A, before[0], equal_nan=True)
    torch.testing.assert_close(B, before[1], equal_nan=True)


def adam_step(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(**batch(), labels=torch.tensor([0, 1, 0, 1, 1, 0])).loss.backward()
    opt.step()
    return opt


def test_rebasis_resets_or_rotates_the_optimizer_state_of_a_and_b():
    model = bert_model()
    opt = adam_step(model)
    layer = layers(model)[0]
    a_param, b_param = layer.lora_variant["default"].params(layer, "default")
    head = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    rebasis(model, opt, "reset")
    assert a_param not in opt.state and b_param not in opt.state and head in opt.state  # only A and B start afresh

    model = bert_model()
    opt = adam_step(model)
    layer = layers(model)[0]
    a_param, b_param = layer.lora_variant["default"].params(layer, "default")
    A, B = a_param.detach().double().clone(), b_param.detach().double().clone()
    m_a, m_b = opt.state[a_param]["exp_avg"].double().clone(), opt.state[b_param]["exp_avg"].double().clone()
    rebasis(model, opt, "rotate")
    p_a = a_param.detach().double() @ torch.linalg.pinv(A)  # A' = P_A A
    p_b = torch.linalg.pinv(B) @ b_param.detach().double()  # B' = B P_B
    torch.testing.assert_close(p_a @ A, a_param.detach().double(), atol=1e-5, rtol=0)
    # a gradient maps as g_A' = P_A^{-T} g_A and g_B' = g_B P_B^{-T}: so does the first moment
    torch.testing.assert_close(opt.state[a_param]["exp_avg"].double(), torch.linalg.inv(p_a).T @ m_a,
                               atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(opt.state[b_param]["exp_avg"].double(), m_b @ torch.linalg.inv(p_b).T,
                               atol=1e-6, rtol=1e-3)
    assert bool((opt.state[a_param]["exp_avg_sq"] >= 0).all())
    with pytest.raises(ValueError, match="reset or rotate"):
        rebasis(model, opt, "keep")


def test_rebasis_after_names_the_steps():
    sampler = RankSampler(1, 8)
    every = Recipe(sampler, "rowwise", rebasis_every=3, total_steps=10)
    assert [n for n in range(11) if every.rebasis_after(n)] == [3, 6, 9]  # never after the last step
    first = Recipe(sampler, "rowwise", lora_first=0.25, total_steps=10)
    assert first.switch_step == 2 and [n for n in range(11) if first.rebasis_after(n)] == [2]
    assert first.passes(0, 4) == first.passes(1, 4) == [RecipePass("rank", (8,))]
    assert [p.kind for p in first.passes(2, 4)] == ["rows"]
    with pytest.raises(ValueError, match="total_steps"):
        Recipe(sampler, "rowwise", lora_first=0.5).passes(0, 4)


def toy_dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, 6), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 60).long().tolist()})


def targs(tmp_path, steps):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)


class Ordered:
    """Records, after each optimizer step (before the recipe's callback), whether every layer's components come in
    singular-value order with orthogonal A rows of one norm (what a re-basis leaves)."""

    def __init__(self, model):
        self.model, self.ordered = model, []

    def check(self):
        ok = True
        for layer in layers(self.model):
            A, B = (t.detach().double() for t in layer.lora_variant["default"].factors(layer, "default"))
            gram = A @ A.T
            ok &= bool(torch.allclose(gram, gram[0, 0] * torch.eye(8, dtype=torch.float64), atol=1e-4))
            norms = B.norm(dim=0)
            ok &= bool((norms[:-1] >= norms[1:] - 1e-6).all())
        return ok


def test_trainer_rebases_after_every_kth_step_and_keeps_the_model(tmp_path):
    model = bert_model(rebasis_every=2)
    probe = Ordered(model)
    seen = []

    def hook(module, args, kwargs):  # the state of the factors at each training forward
        if module.training:
            seen.append(probe.check())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer = DyLoraTrainer(model=model, args=targs(tmp_path, 6), train_dataset=toy_dataset())
    trainer.train()
    assert trainer.recipe_callback.rebased == [2, 4]
    # the forwards of steps 2 and 4 start from re-based factors; the others (trained since) do not
    assert seen == [False, False, True, False, True, False]


def test_lora_first_trains_plain_lora_then_switches_once_at_the_step_it_names(tmp_path):
    model = bert_model(lora_first=0.5, distill=True)
    layer = layers(model)[0]
    scales = []
    model.register_forward_pre_hook(lambda m, a, k: scales.append(layer.dylora_rank_scale["default"].clone())
                                    if m.training else None, with_kwargs=True)
    trainer = DyLoraTrainer(model=model, args=targs(tmp_path, 6), train_dataset=toy_dataset())
    trainer.train()
    assert trainer.recipe.switch_step == 3 and trainer.recipe_callback.rebased == [3]
    r_max = torch.full((8,), 2.0)
    assert [s.shape for s in scales[:3]] == [(8,)] * 3 and all(torch.equal(s, r_max) for s in scales[:3])
    # then rowwise with its teacher: a pass at r_max, then a pass with a rank per row, on each of steps 3, 4, 5
    assert [tuple(s.shape) for s in scales[3:]] == [(8,), (4, 8)] * 3


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rebasis_every": -1}, "rebasis_every="), ({"rebasis_every": 2.0}, "rebasis_every="),
    ({"recipe": "paper", "rebasis_every": 2}, "rebasis_every="), ({"rebasis_state": "keep"}, "rebasis_state="),
    ({"lora_first": 1.0}, "lora_first="), ({"lora_first": -0.1}, "lora_first="),
    ({"recipe": "sandwich", "lora_first": 0.5}, "lora_first="),
])
def test_invalid_rebasis_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        DyLoraConfig(target_modules=["query"], **{"recipe": "rowwise", **kwargs})
    assert "\n" not in str(err.value)


def test_rebasis_settings_go_to_the_sidecar_and_old_sidecars_load(tmp_path):
    cfg = DyLoraConfig(r=4, target_modules=["query"], recipe="rowwise", rebasis_every=5, rebasis_state="rotate",
                       lora_first=0.75)
    dylora.save(dylora.get_dylora_model(tiny_bert(), cfg), tmp_path / "a")
    side = tmp_path / "a" / "dylora_config.json"
    assert {k: json.loads(side.read_text())[k] for k in ("rebasis_every", "rebasis_state", "lora_first")} == \
        {"rebasis_every": 5, "rebasis_state": "rotate", "lora_first": 0.75}
    loaded = dylora_adapters(dylora.load(tiny_bert(), tmp_path / "a"))["default"]
    assert (loaded.rebasis_every, loaded.rebasis_state, loaded.lora_first) == (5, "rotate", 0.75)
    recipe = Recipe.from_config(loaded)
    assert (recipe.rebasis_every, recipe.rebasis_state, recipe.lora_first) == (5, "rotate", 0.75)
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items()
                                if k not in ("rebasis_every", "rebasis_state", "lora_first")}))
    old = dylora_adapters(dylora.load(tiny_bert(), tmp_path / "a"))["default"]
    assert (old.rebasis_every, old.rebasis_state, old.lora_first) == (0, "reset", 0.0)
