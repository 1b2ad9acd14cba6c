"""QDyLoRA: DyLoRA on a bitsandbytes 4-bit (nf4 / fp4, double quantization or not) or 8-bit base.

At every rank b the output of an adapted layer is dequant(W0) x + (alpha/b) B_b A_b x (the SVD basis: the best
rank-b approximation of the r_max update), with W0 x computed by bitsandbytes' own kernels; the adapter trains
with every recipe, exports as a plain LoRA that vanilla PEFT loads onto the same quantized base, and merges into
a dequantized model (or, with requantize=True, PEFT's requantized one).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="QDyLoRA needs bitsandbytes: make venv installs 'dylora[quant]'")

from conftest import randomise_lora  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from tiny import ask, make_tiny_model, run_cli  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

import dylora  # noqa: E402
from dylora import quantized  # noqa: E402
from dylora.app import zoo  # noqa: E402
from dylora.app.cli import main  # noqa: E402
from dylora.app.run import load_run  # noqa: E402
from dylora.functional import svd_mixers  # noqa: E402

torch.set_num_threads(1)

R, ALPHA = 4, 8
QUANT = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}
BITS = {"nf4-dq": "4bit", "fp4": "4bit", "8bit": "8bit"}
IDS = torch.tensor([[3, 17, 42, 99, 5, 61, 7], [11, 2, 88, 23, 64, 9, 30]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A small random Llama (hidden 64: bitsandbytes' CPU 4-bit kernel needs rows of at least its block size)."""
    cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_base(path, kind: str | None):
    kw = {} if kind is None else dict(quantization_config=BitsAndBytesConfig(**QUANT[kind]), device_map="cpu")
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def dylora_model(path, kind, seed=1):
    model = dylora.get_dylora_model(load_base(path, kind), dylora.DyLoraConfig(
        r=R, r_min=1, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    randomise_lora(model, seed=seed, std=0.2)
    return model.eval()


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("kind", list(QUANT))
def test_at_every_rank_and_basis_a_quantized_layer_is_dequant_w0_x_plus_the_rank_b_update(base_dir, kind):
    model = dylora_model(base_dir, kind)
    assert {quantized.quant_kind(m.get_base_layer()) for m in layers(model).values()} == {BITS[kind]}
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for layer in layers(model).values():
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        h = x if layer.in_features == 64 else torch.randn(5, layer.in_features)
        w0 = quantized.dequantized_weight(layer.get_base_layer()).double()
        m_in, m_out, _ = svd_mixers(A, B, ALPHA / R)
        for b in range(1, R + 1):
            for basis in ("prefix", "svd"):
                dylora.set_rank(model, b, basis=basis)
                with torch.no_grad():
                    base_out = layer.get_base_layer()(h).double()
                    out = layer(h).double()
                if basis == "prefix":
                    update = (ALPHA / b) * B[:, :b] @ A[:b]
                else:  # Eckart-Young: the top b singular directions of c(r) B A
                    update = B @ m_out[:, :b] @ m_in[:b] @ A
                torch.testing.assert_close(out - base_out, h.double() @ update.T, atol=1e-5, rtol=1e-5)
                # bitsandbytes' own matmul against the dequantized weight (8-bit rounds x to int8 as well)
                tol = 0.05 if kind == "8bit" else 5e-3
                assert (base_out - h.double() @ w0.T).abs().max() <= tol * (1 + (h.double() @ w0.T).abs().max())


@pytest.mark.parametrize("kind", ["nf4-dq", "8bit"])
def test_rowwise_ranks_on_a_quantized_base_equal_each_row_at_its_own_rank(base_dir, kind):
    model = dylora_model(base_dir, kind)
    ranks = [1, R, 2]
    ids = torch.cat([IDS, IDS[:1]])
    with torch.no_grad(), dylora.example_ranks(model, ranks):
        rows = model(ids).logits
    for j, b in enumerate(ranks):
        with torch.no_grad(), dylora.at_rank(model, b):
            alone = model(ids[j:j + 1]).logits
        torch.testing.assert_close(rows[j:j + 1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", ["paper", "sandwich", "rowwise", "nested"])
def test_every_recipe_trains_the_adapter_and_never_the_quantized_base(base_dir, tmp_path, recipe):
    model = dylora.get_dylora_model(load_base(base_dir, "nf4-dq"), dylora.DyLoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", recipe=recipe))
    quantized_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    data = Dataset.from_dict({"input_ids": IDS.repeat(4, 1).tolist(), "labels": IDS.repeat(4, 1).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = dylora.DyLoraTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in lora_before.items())
    assert all(torch.equal(after[n].detach(), p) for n, p in quantized_before.items())


# plain PEFT loads each export onto the quantized base, in a process that never imports dylora (`tiny.ask`)
VANILLA = """
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
torch.set_num_threads(1)  # as in the test: bitsandbytes' CPU kernel sums in a thread-dependent order

def handle(base_dir, kw, ids, jobs):
    kw = {k: getattr(torch, v[6:]) if isinstance(v, str) and v.startswith("torch.") else v for k, v in kw.items()}
    for adapter, out in jobs:
        base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**kw),
                                                    device_map="cpu")
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            save_file({"logits": model(torch.tensor(ids)).logits.contiguous()}, out)
"""


@pytest.mark.parametrize("kind", ["nf4-dq", "8bit"])
def test_an_exported_rank_loads_in_vanilla_peft_onto_the_quantized_base_with_equal_outputs(base_dir, tmp_path, kind):
    from safetensors.torch import load_file

    ranks = {"model.layers.0.self_attn.q_proj": 1, "model.layers.1.mlp.down_proj": 3}
    cases = {"rank2-prefix": dict(rank=2), "rank3-svd": dict(rank=3, basis="svd"), "per-layer": dict(ranks=ranks)}
    expected = {}
    for case, options in cases.items():
        # a fresh model each time: a state-dict read (the export) of a 4-bit layer that bitsandbytes repacked for
        # its CPU kernel (an inference forward) moves W0 by a rounding (see quantized.unpack_cpu_weights)
        model = dylora_model(base_dir, kind)
        dylora.export_lora(model, path=tmp_path / case, **options)
        if "ranks" in options:
            dylora.set_layer_ranks(model, ranks)
        else:
            dylora.set_rank(model, options["rank"], basis=options.get("basis", "prefix"))
        with torch.no_grad():
            expected[case] = model(IDS).logits
    kw = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in QUANT[kind].items()}
    jobs = [(str(tmp_path / case), str(tmp_path / f"{case}.safetensors")) for case in cases]
    ask(VANILLA, str(base_dir), kw, IDS.tolist(), jobs)
    # 8-bit: PEFT adds a plain LoRA's output after casting it to the base output's dtype, the variant before
    tol = 5e-3 if kind == "8bit" else 1e-4
    for case in cases:
        got = load_file(tmp_path / f"{case}.safetensors")["logits"]
        torch.testing.assert_close(got, expected[case], atol=tol, rtol=tol, msg=case)


@pytest.mark.parametrize("kind", list(QUANT))
def test_merge_dequantizes_by_default_and_loses_less_than_the_requantizing_merge(base_dir, kind):
    """Outputs compared in train mode (no dropout here), where bitsandbytes computes W0 x in float32; its CPU
    inference kernel computes in bfloat16 on AVX512-BF16 machines, an error of its own (see the next test)."""
    model = dylora_model(base_dir, kind)
    dylora.set_rank(model, 3)
    with torch.no_grad():
        reference = model.train()(IDS).logits
        dense = dylora.merge(model, rank=3)
        requantized = dylora.merge(model, rank=3, requantize=True)
        err_dense = (dense.train()(IDS).logits - reference).abs().max().item()
        err_requant = (requantized.train()(IDS).logits - reference).abs().max().item()
    assert not quantized.is_quantized(dense) and getattr(dense.config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in dense.named_modules() if n.endswith(("q_proj", "up_proj")))
    assert quantized.is_quantized(requantized)
    scale = reference.abs().max().item()
    assert err_dense < err_requant
    assert err_dense <= (0.02 if kind == "8bit" else 1e-4) * scale
    assert err_requant <= scale  # bounded, but the sum is rounded into the 4-bit / 8-bit grid again
    assert dylora.get_rank(model) == 3  # the source model is untouched (a copy was merged)


def test_a_merge_after_an_inference_forward_reads_the_w0_the_kernel_uses(base_dir):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on the first inference forward (absmax in
    bfloat16); a merge after that folds the update into that W0, and leaves the layer as it was."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    model = dylora_model(base_dir, "nf4-dq")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = quantized.dequantized_weight(layer.get_base_layer())
    with torch.no_grad():
        model(IDS)
    weight = layer.get_base_layer().weight
    assert weight.quant_state.packing_format_for_cpu
    packed = weight.data.clone()
    after = quantized.dequantized_weight(layer.get_base_layer())
    assert torch.equal(weight.data, packed) and weight.quant_state.packing_format_for_cpu  # untouched
    # the same W0 up to absmax's bfloat16 rounding (8 bits of mantissa)
    assert (after - before).abs().max() <= 2 ** -7 * before.abs().max()
    dylora.set_rank(model, 2)
    merged = dylora.merge(model, rank=2)
    dense = merged.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(dense.weight, after + layer.get_delta_weight("default").float(), atol=1e-6, rtol=0)


def test_save_load_and_the_full_precision_base(base_dir, tmp_path):
    """An adapter trained on a 4-bit base reloads onto it with equal outputs, and onto the full-precision base
    (the usual deployment) within the quantization error of the base itself."""
    model = dylora_model(base_dir, "nf4-dq")
    dylora.save(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(IDS).logits
        again = dylora.load(load_base(base_dir, "nf4-dq"), tmp_path / "adapter")
        torch.testing.assert_close(again(IDS).logits, expected, atol=1e-5, rtol=1e-5)
        full = dylora.load(load_base(base_dir, None), tmp_path / "adapter")
        gap_base = (load_base(base_dir, None)(IDS).logits - load_base(base_dir, "nf4-dq")(IDS).logits).abs().max()
        gap = (full(IDS).logits - expected).abs().max()
        for b in (1, 2):
            with dylora.at_rank(full, b), dylora.at_rank(again, b):
                assert (full(IDS).logits - again(IDS).logits).abs().max() <= 3 * gap_base + 1e-4
    assert gap <= 3 * gap_base + 1e-4


def test_peft_bnb_layers_take_the_linear_variant():
    from peft.tuners.lora import bnb as lora_bnb

    from dylora.layers import DyLoraLinearVariant, quantized_linear_layers

    assert set(quantized_linear_layers()) == {lora_bnb.Linear8bitLt, lora_bnb.Linear4bit}
    assert all(dylora.layers.variant_for(cls.__new__(cls)) is DyLoraLinearVariant for cls in quantized_linear_layers())


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama", hidden_size=64))


COMMON = ["--data", "bbc-headlines", "--max-train", "40", "--r", "4", "--max-eval", "4", "--batch-size", "8",
          "--quiet"]


@pytest.fixture(scope="module")
def q4_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "q4"
    proc = run_cli("train", "--model", tiny_llama, *COMMON, "--max-steps", "4", "--save-steps", "2",
                   "--keep-checkpoints", "--quantize", "4bit", "--out", out, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_quantized_run_records_how_its_base_was_loaded(q4_run):
    record = json.loads((q4_run / "run.json").read_text())["settings"]
    assert (record["quantize"], record["quant_type"], record["double_quant"]) == ("4bit", "nf4", True)
    card = (q4_run / "adapter" / "README.md").read_text()
    assert "base quantized: 4-bit (bitsandbytes nf4, double quantization" in card
    loaded, _, _, _ = load_run(q4_run)
    assert quantized.is_quantized(loaded)


def test_sweep_export_merge_allocate_and_generate_load_the_base_quantized(q4_run, tmp_path, tiny_llama, capsys):
    assert main(["sweep", str(q4_run), "--ranks", "1,4", "--quiet"]) == 0
    assert main(["export", str(q4_run), "--rank", "2", "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(q4_run), "--rank", "2", "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert main(["allocate", str(q4_run), "--budget", "2"]) == 0
    assert main(["generate", str(q4_run), "--rank", "2", "Shares rose sharply on Monday."]) == 0
    capsys.readouterr()
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    dy, tokenizer, _, _ = load_run(q4_run)
    ids = tokenizer("Shares rose sharply on Monday.", return_tensors="pt").input_ids
    kwargs = zoo.load_kwargs("4bit")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, **kwargs),
                                      str(tmp_path / "lora")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad(), dylora.at_rank(dy, 2):
        expected = dy(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        assert (merged(input_ids=ids).logits - expected).abs().max() <= 2e-3 * (1 + expected.abs().max())


def test_a_quantized_run_resumes_to_the_uninterrupted_adapter(q4_run, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    checkpoints = tmp_path / "resumed.partial" / "checkpoints"
    checkpoints.mkdir(parents=True)  # what a run killed after its step-2 checkpoint leaves
    shutil.copytree(q4_run / "checkpoints" / "checkpoint-2", checkpoints / "checkpoint-2")
    proc = run_cli("train", "--model", tiny_llama, *COMMON, "--max-steps", "4", "--save-steps", "2",
                   "--quantize", "4bit", "--out", out, "--resume", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (q4_run, out))
    assert set(ref) == set(got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6)


def test_bad_quantize_input_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cases = [
        (["--quantize", "3bit"], "--quantize must be one of 4bit, 8bit"),
        (["--quantize", "4bit", "--quant-type", "int3"], "--quant-type must be one of nf4, fp4"),
        (["--quantize", "4bit", "--compute-dtype", "float8"], "--compute-dtype must be one of"),
        (["--quantize", "4bit", "--target-modules", "embed_tokens"], "no target module (embed_tokens)"),
    ]
    for extra, message in cases:
        assert main(["train", "--model", tiny_llama, *COMMON, "--max-steps", "1", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not out.exists() and not out.with_name("run.partial").exists()
    # without bitsandbytes (it is installed here, so its absence is simulated: find_spec answers None for it)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert main(["lora", "--model", tiny_llama, *COMMON, "--max-steps", "1", "--out", str(out),
                 "--quantize", "4bit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'dylora[quant]'" in err
    assert not out.exists()


# ---------------------------------------------------------------- torchao (int8 weight-only)


def torchao_model(path):
    ao = pytest.importorskip("torchao", reason="the torchao base needs torchao: make venv installs 'dylora[quant]'")
    from transformers import TorchAoConfig

    base = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=TorchAoConfig(quant_type=ao.quantization.Int8WeightOnlyConfig()), device_map="cpu")
    config = dylora.DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dylora.get_dylora_model(base, config)
    randomise_lora(model, seed=3, std=0.2)
    return model.eval()


def test_a_torchao_int8_base_takes_every_rank_and_merges_dequantized(base_dir):
    model = torchao_model(base_dir)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert quantized.quant_kind(layer.get_base_layer()) == "torchao"
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w0 = quantized.dequantized_weight(layer.get_base_layer())
    with torch.no_grad():
        for b in (1, 3, R):
            dylora.set_rank(model, b)
            torch.testing.assert_close(layer(h) - layer.get_base_layer()(h), (ALPHA / b) * h @ A[:b].T @ B[:, :b].T,
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.get_base_layer()(h), h @ w0.T, atol=1e-4, rtol=1e-4)
        dylora.set_rank(model, 3)
        reference = model(IDS).logits
        dense = dylora.merge(model, rank=3)
        requantized = dylora.merge(model, rank=3, requantize=True)
        err_dense = (dense(IDS).logits - reference).abs().max()
        err_requant = (requantized(IDS).logits - reference).abs().max()
    assert not quantized.is_quantized(dense) and quantized.is_quantized(requantized)
    assert err_dense <= 1e-4 * reference.abs().max() and err_dense < err_requant


def test_a_torchao_merge_through_peft_still_fixes_the_rank(base_dir):
    """PEFT's torchao layer merges through get_delta_weight, not the variant: the rank is still locked while
    merged (unmerging at another rank would subtract the wrong update from W0)."""
    model = torchao_model(base_dir)
    dylora.set_rank(model, 3)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights"):
        dylora.set_rank(model, 2)
    model.unmerge_adapter()
    dylora.set_rank(model, 2)


def test_the_llm_page_recipe_qdylora_with_trl_and_gradient_checkpointing(tiny_llama, tmp_path):
    """docs/llm.md: a 4-bit base, prepare_model_for_kbit_training with gradient checkpointing, TRL's
    SFTTrainer with the rowwise recipe, then every rank exported as a plain LoRA."""
    trl = pytest.importorskip("trl", reason="the TRL path needs trl: make venv installs 'dylora[eco]'")
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training
    from transformers import AutoTokenizer

    from dylora.trl import DyLoraSFTTrainer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, **zoo.load_kwargs("4bit"))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = dylora.DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                 recipe="rowwise", distill=False)
    texts = ["the cat sat on the mat", "a dog ran in the park", "rain fell all day long", "the sun rises early"]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], save_strategy="no", max_length=16, use_cpu=True, logging_steps=1,
                         gradient_checkpointing=True)
    trainer = DyLoraSFTTrainer(model=base, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                               processing_class=tokenizer, peft_config=config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    model = trainer.model.eval()
    for b in (1, 4):
        dylora.export_lora(model, rank=b, path=tmp_path / f"r{b}")
        assert json.loads((tmp_path / f"r{b}" / "adapter_config.json").read_text())["r"] == b
