"""DyLoRA on a diffusers UNet (attention projections and resnet convolutions), and kohya files that diffusers'
own loader reads back to the same output at rank b."""

import copy

import pytest
import torch
from conftest import randomise_lora
from peft.tuners.lora.layer import LoraLayer
from safetensors import safe_open

import dylora
from dylora import DyLoraConfig
from dylora.functional import rank_coefficient

diffusers = pytest.importorskip("diffusers", reason="diffusers is installed by `make test` (the eco extra)")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4).eval()


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16)).eval()


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 12, generator=g)


def dylora_unet(base, r=4, alpha=8, **kw):
    model = dylora.get_dylora_model(base, DyLoraConfig(r=r, lora_alpha=alpha, target_modules=UNET_TARGETS, **kw))
    randomise_lora(model, std=0.1)
    return model


def merged_by_hand(model, pristine, b, alpha):
    """The pristine UNet with W0 + (alpha/b) B[:, :b] A[:b] in every adapted layer (convs: over the channel dims)."""
    ref = copy.deepcopy(pristine)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer) and "default" in m.lora_A:
                A, B = m.lora_A["default"].weight[:b], m.lora_B["default"].weight[:, :b]
                if A.dim() == 4:
                    delta = torch.einsum("oj,jikl->oikl", B[:, :, 0, 0], A)
                else:
                    delta = B @ A
                ref.get_submodule(name.removeprefix("base_model.model.")).weight += (alpha / b) * delta
    return ref


def test_unet_attention_and_convs_at_several_ranks():
    pristine = tiny_unet()
    model = dylora_unet(copy.deepcopy(pristine))
    kinds = {type(m.get_base_layer()).__name__ for m in model.modules() if isinstance(m, LoraLayer)}
    assert kinds == {"Linear", "Conv2d"}
    x, t, enc = unet_inputs()
    for b in (1, 2, 4):
        dylora.set_rank(model, b)
        with torch.no_grad():
            got = model(x, t, encoder_hidden_states=enc).sample
            want = merged_by_hand(model, pristine, b, 8)(x, t, encoder_hidden_states=enc).sample
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unet_training_step():
    """One rank per step: only components 1..b of the LoRA weights get gradient, the UNet's own none; Adam steps
    at that rank lower the denoising loss."""
    model = dylora_unet(tiny_unet()).train()
    x, t, enc = unet_inputs()
    noise = torch.randn_like(x, generator=torch.Generator().manual_seed(1))
    b = 2
    dylora.set_rank(model, b)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=enc).sample, noise)
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 1:
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    assert p.grad[:b].abs().sum() > 0 and torch.count_nonzero(p.grad[b:]) == 0, name
                elif "lora_B" in name:
                    assert p.grad[:, :b].abs().sum() > 0 and torch.count_nonzero(p.grad[:, b:]) == 0, name
                else:
                    assert p.grad is None, name
        opt.step()
    assert losses[-1] < losses[0]


def test_pipeline_runs_the_dylora_unet_at_rank_b():
    """`pipe.unet = model.get_base_model()`: the pipeline denoises at the rank set, as with rank b merged in."""
    model = dylora_unet(tiny_unet())
    te = tiny_text_encoder()
    enc = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(0))

    def latents(unet):
        pipe = tiny_pipeline(unet, te)
        return pipe(prompt_embeds=enc, negative_prompt_embeds=torch.zeros_like(enc), num_inference_steps=2,
                    height=8, width=8, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    with dylora.at_rank(model, 2):
        got = latents(model.get_base_model())
    torch.testing.assert_close(got, latents(dylora.merge(model, 2)), atol=1e-4, rtol=1e-4)
    with dylora.at_rank(model, 4):
        assert (latents(model.get_base_model()) - got).abs().max() > 1e-2


# ---------------------------------------------------------------- kohya files


@pytest.fixture(scope="module")
def sd_models():
    """A DyLoRA UNet and text encoder (alpha/sqrt(b) scaling on the encoder), and the pristine ones."""
    unet, te = tiny_unet(), tiny_text_encoder()
    pristine = copy.deepcopy(unet), copy.deepcopy(te)
    mu = dylora_unet(unet, alpha=8)
    mt = dylora.get_dylora_model(te, DyLoraConfig(r=4, r_min=2, lora_alpha=6, rank_scaling="alpha/sqrt(b)",
                                                  target_modules=TE_TARGETS))
    randomise_lora(mt, seed=2, std=0.1)
    return mu, mt, pristine


def tiny_pipeline(unet, text_encoder):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def test_kohya_file_loads_in_diffusers_pipeline_to_the_same_output(sd_models, tmp_path):
    mu, mt, (unet0, te0) = sd_models
    b = 3
    path = dylora.export_kohya({"unet": mu, "text_encoder": mt}, b, tmp_path / "style.safetensors",
                               base_model="tiny-sd", command="dylora export --format kohya --rank 3")
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        assert f.get_tensor(q + ".lora_down.weight").shape == (b, 8)
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape == (b, 8, 3, 3)
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").shape == (8, b, 1, 1)
        assert f.get_tensor(q + ".alpha").item() == pytest.approx(8)  # alpha / b = 8 / b
        te_alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item()
        assert te_alpha / b == pytest.approx(rank_coefficient(b, 6, "alpha/sqrt(b)"))  # 6 / sqrt(b)
    assert meta["ss_network_dim"] == "3" and meta["dylora_r_max"] == "4" and meta["ss_sd_model_name"] == "tiny-sd"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    card = (tmp_path / "style.md").read_text()
    assert "rank: 3 of r_max = 4" in card and "dylora export --format kohya" in card

    pipe = tiny_pipeline(copy.deepcopy(unet0), copy.deepcopy(te0))
    x, t, enc = unet_inputs()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=enc).sample, pipe.text_encoder(input_ids=ids)[0]
    pipe.load_lora_weights(str(tmp_path), weight_name="style.safetensors")
    with dylora.at_rank(mu, b), dylora.at_rank(mt, b), torch.no_grad():
        ours = mu(x, t, encoder_hidden_states=enc).sample, mt(input_ids=ids)[0]
        theirs = pipe.unet(x, t, encoder_hidden_states=enc).sample, pipe.text_encoder(input_ids=ids)[0]
    for o, th, bef in zip(ours, theirs, before, strict=True):
        assert (o - bef).abs().max() > 1e-2  # the LoRA changes the output ...
        assert (o - th).abs().max() <= 1e-5  # ... and diffusers' loader computes exactly DyLoRA's rank b


def test_kohya_errors(sd_models, tmp_path):
    from conftest import tiny_bert

    mu, mt, _ = sd_models
    bert = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="BertForSequenceClassification, which has no kohya naming") as err:
        dylora.export_kohya(bert, 2, tmp_path / "x.safetensors")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"rank 1 is outside \[r_min, r\] = \[2, 4\]"):
        dylora.export_kohya({"unet": mu, "text_encoder": mt}, 1, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unknown pipeline component 'vae'"):
        dylora.export_kohya({"vae": mu}, 2, tmp_path / "x.safetensors")
    te = dylora.get_dylora_model(tiny_text_encoder(), DyLoraConfig(r=2, target_modules=["q_proj", "token_embedding"]))
    with pytest.raises(ValueError, match=r"Linear and Conv layers only, not on '.*token_embedding' \(Embedding\)"):
        dylora.export_kohya(te, 2, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written
