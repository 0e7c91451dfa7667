"""SD_Model.py against independent references: diffusers' UNet2DConditionModel, DDIM/DDPM schedulers and
single-file converter; the formulas; and exact counts."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

import SD_Model as M
from conftest import ROOT, fake_model


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def diffusers_unet(sd2=False, chans=(32, 64, 64), heads=None, groups=8, seed=0):
    """A small random diffusers UNet of SD1 topology (conv proj, fixed heads) or SD2 (linear proj, ctx 48)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=chans, layers_per_block=2, norm_num_groups=groups,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48 if sd2 else 32, use_linear_projection=sd2,
        attention_head_dim=heads or ((1, 2, 2) if sd2 else 2))
    for p in unet.parameters():  # diffusers zero-inits some outputs too; random weights test every path
        torch.nn.init.normal_(p, std=0.05)
    return unet.eval()


def unet_inputs(unet, n=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    ctx = torch.randn(n, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 900][:n]), ctx


# --- parameter counts and layout -------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("sd1", 859_520_964), ("sd2", 865_910_724)])
def test_parameter_counts(name, count):
    with torch.device("meta"):
        assert M.count_params(M.UNet(M.unet_config(name))) == count


@pytest.mark.slow
def test_info_cli_prints_count():
    out = subprocess.run([sys.executable, "SD_Model.py", "info", "--config", "sd1"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "859,520,964 parameters" in out and "8 x 160" in out


# --- parity with diffusers -------------------------------------------------------------------------------

@pytest.mark.parametrize("sd2", [False, True], ids=["sd1-topology", "sd2-topology"])
def test_parity_from_diffusers_folder(tmp_path, sd2):
    ref = diffusers_unet(sd2)
    ref.save_pretrained(tmp_path / "unet")
    ours = M.load_unet(tmp_path / "unet").eval()
    assert M.count_params(ours) == sum(p.numel() for p in ref.parameters())
    x, t, ctx = unet_inputs(ref)
    with torch.no_grad():
        assert rel_err(ref(x, t, ctx).sample, ours(x, t, ctx)) <= 1e-4


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1-topology", "sd2-topology"])
def test_single_file_export_matches_diffusers_converter(tmp_path, sd2):
    """Our single-file export (the original layout), read by diffusers' own ldm converter, gives diffusers'
    exact weights."""
    ref = diffusers_unet(sd2)
    ref.save_pretrained(tmp_path / "unet")
    M.main(_args("convert", str(tmp_path / "unet"), str(tmp_path / "orig.safetensors"), format="single-file"))
    converted = convert_ldm_unet_checkpoint(load_file(tmp_path / "orig.safetensors"), dict(ref.config))
    expected = ref.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_full_size_single_file_is_read_as_sd1_by_diffusers_and_the_uis():
    """The key names and shapes of a full-size SD1 single-file export (built on the meta device: no memory), read
    the way the tools that load such files tell SD1 from SD2: diffusers' infer_diffusers_model_type, AUTOMATIC1111's
    guess_model_config_from_state_dict (no OpenCLIP key, 4 input channels -> v1) and ComfyUI's UNet detection
    (context width from attn2.to_k, conv proj_in)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = M.UNet(M.unet_config("sd1"))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77))
    sd = M.single_file_state(unet.state_dict(), unet.config, vae, clip, torch.float16)
    assert infer_diffusers_model_type(sd) == "v1"
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" not in sd          # A1111: not v2
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 4                        # not inpainting
    assert sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 4                   # conv proj: SD1
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)           # 1x1 convs
    # as many UNet and VAE keys as SD 1.x's released files hold (686 and 248)
    assert sum(k.startswith(M.ORIGINAL_PREFIX) for k in sd) == 686
    assert sum(k.startswith("first_stage_model.") for k in sd) == 248


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1-topology", "sd2-topology"])
def test_parity_from_foreign_original_single_file(tmp_path, sd2):
    """A single file without our metadata (as CompVis/Stability ship them): the config is inferred from the
    tensor shapes with SD's conventions (8 heads for SD1, 64-wide heads for SD2, GroupNorm of 32)."""
    ref = diffusers_unet(sd2, chans=(64, 128, 128), heads=(1, 2, 2) if sd2 else 8, groups=32)
    sd, cfg, _ = M.read_unet_state(_saved_diffusers(ref, tmp_path))
    key_map = M.original_key_map(cfg)
    orig = {M.ORIGINAL_PREFIX + key_map[k]: v for k, v in sd.items()}
    orig["cond_stage_model.transformer.dummy"] = torch.zeros(1)  # a full file carries other parts too
    save_file(orig, str(tmp_path / "sd.safetensors"))
    torch.save({"state_dict": orig}, tmp_path / "sd.ckpt")
    # NeMo's .nemo: a tar of model_config.yaml + model_weights.ckpt, keys one "model." deeper
    torch.save({"model." + k: v for k, v in orig.items()}, tmp_path / "model_weights.ckpt")
    (tmp_path / "model_config.yaml").write_text("unet_config: {}\n")
    with tarfile.open(tmp_path / "sd.nemo", "w:") as tf:
        for name in ("model_config.yaml", "model_weights.ckpt"):
            tf.add(tmp_path / name, arcname=f"./{name}")
    x, t, ctx = unet_inputs(ref)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        for f in ("sd.safetensors", "sd.ckpt", "sd.nemo"):
            ours = M.load_unet(tmp_path / f).eval()
            assert ours.config == cfg
            assert rel_err(expected, ours(x, t, ctx)) <= 1e-4


@pytest.mark.slow
def test_parity_full_size_sd1():
    torch.manual_seed(0)
    ref = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()  # diffusers' SD1 defaults
    ours = M.build_unet(M.config_from_diffusers(dict(ref.config)), ref.state_dict()).eval()
    assert ours.config == M.unet_config("sd1")
    x = torch.randn(1, 4, 32, 32)
    ctx = torch.randn(1, 77, 768)
    t = torch.tensor([500])
    with torch.no_grad():
        assert rel_err(ref(x, t, ctx).sample, ours(x, t, ctx)) <= 1e-4


def _saved_diffusers(ref, tmp_path):
    ref.save_pretrained(tmp_path / "ref_unet")
    return tmp_path / "ref_unet"


def _args(command, src=None, dst=None, format=None, weights="ema", config=None):
    import argparse
    return argparse.Namespace(command=command, src=src, dst=dst, format=format, weights=weights, config=config)


# --- checkpoint formats ----------------------------------------------------------------------------------

def test_convert_round_trip_is_bit_exact(tmp_path):
    ref = diffusers_unet(sd2=True)
    src = _saved_diffusers(ref, tmp_path)
    steps = [("ours", "a.safetensors"), ("single-file", "b.safetensors"), ("diffusers", "c"), ("ours", "d.safetensors")]
    prev = src
    for fmt, name in steps:
        cmd = [sys.executable, "SD_Model.py", "convert", str(prev), str(tmp_path / name), "--format", fmt]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        prev = tmp_path / name
    final, cfg, _ = M.read_unet_state(prev)
    start = ref.state_dict()
    assert cfg == M.config_from_diffusers(dict(ref.config))
    assert set(final) == set(start) and all(torch.equal(final[k], start[k]) for k in start)


def test_training_checkpoint_prefers_ema_and_strips_wrappers(tmp_path):
    cfg = M.unet_config("small")
    live = M.UNet(cfg).state_dict()
    ema = {k: v + 1 for k, v in live.items()}
    torch.save({"unet": {"module._orig_mod." + k: v for k, v in live.items()},
                "ema": {"_fsdp_wrapped_module." + k: v for k, v in ema.items()},
                "meta": {"model_config": json.loads(json.dumps(M.asdict(cfg)))}}, tmp_path / "ckpt.pt")
    got = M.load_unet(tmp_path / "ckpt.pt").state_dict()
    assert all(torch.equal(got[k], ema[k]) for k in ema)
    M.main(_args("convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "live.safetensors"), "ours", weights="live"))
    got = M.load_unet(tmp_path / "live.safetensors").state_dict()
    assert all(torch.equal(got[k], live[k]) for k in live)
    sd, _, _ = M.read_unet_state(tmp_path / "ckpt.pt", prefer_ema=False)
    assert all(torch.equal(sd[k], live[k]) for k in live)


def test_mismatched_keys_give_clear_error(tmp_path):
    ref = diffusers_unet()
    sd = ref.state_dict()
    sd.pop("conv_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    with pytest.raises(M.UserError, match=r"1 missing keys \['conv_in.weight'\].*1 unexpected keys \['extra.weight'\]"):
        M.load_unet(tmp_path)


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(M.UserError, match="does not exist"):
        M.load_unet(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(M.UserError, match="not a readable weights file"):
        M.load_unet(tmp_path / "junk.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(M.UserError, match="not a UNet checkpoint"):
        M.load_unet(tmp_path / "other.pt")
    with pytest.raises(M.UserError, match="outside the SD 1.x/2.x family"):
        M.config_from_diffusers({**dict(diffusers_unet().config), "addition_embed_type": "text_time"})


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"state_dict": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(M.UserError, match="not a readable weights file"):
        M.load_unet(tmp_path / "evil.ckpt")
    from tiny_models import save_tiny_clip
    clip = save_tiny_clip(tmp_path / "clip")                 # a text encoder folder whose weights are such a .bin
    (clip / "model.safetensors").unlink()
    torch.save({"text_model.embeddings.position_ids": Evil()}, clip / "pytorch_model.bin")
    with pytest.raises(M.UserError, match=r"holds pickled weights \(.bin\) that would run code .* refused"):
        M.FrozenTextEncoder(clip)


# --- model behaviour -------------------------------------------------------------------------------------

def test_zero_init_predicts_zero_and_zeroes_output_projections():
    unet = M.build_unet("small")
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), torch.randn(2, 7, 32)
    assert torch.count_nonzero(unet(x, t, ctx)) == 0
    zeroed = [n for n, p in unet.named_parameters() if n.endswith("weight") and not p.any()]
    n_res = sum(isinstance(m, M.ResBlock) for m in unet.modules())
    n_attn = sum(isinstance(m, M.Attention) for m in unet.modules())
    n_st = sum(isinstance(m, M.SpatialTransformer) for m in unet.modules())
    n_ff = sum(isinstance(m, M.FeedForward) for m in unet.modules())
    assert len(zeroed) == n_res + n_attn + n_st + n_ff + 1   # + conv_out
    assert any("to_out.0" in n for n in zeroed) and any("ff.net.2" in n for n in zeroed)


def _random_small(name="small"):
    torch.manual_seed(0)
    unet = M.UNet(M.unet_config(name))
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return unet


def test_gradient_checkpointing_gives_same_gradients_and_really_recomputes():
    unet = _random_small().train()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 7, 32)
    calls = []                                       # block forwards, counted: checkpointing runs each one twice

    def counted(forward):
        def run(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        return run
    for m in unet.modules():                         # (forward hooks do not fire in checkpoint's recompute)
        if type(m).__name__ in ("ResBlock", "TransformerBlock"):
            m.forward = counted(m.forward)
    grads, forwards = [], []
    for ckpt in (False, True):
        unet.zero_grad()
        unet.set_grad_checkpointing(ckpt)
        calls.clear()
        unet(x, t, ctx).square().mean().backward()
        forwards.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])
    assert forwards[0] > 0 and forwards[1] == 2 * forwards[0]   # a pass-through "checkpoint" would give 1x


@pytest.mark.slow
def test_channels_last_and_compile_match_eager():
    unet = _random_small("small_sd2").eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 7, 48)
    with torch.no_grad():
        ref = unet(x, t, ctx)
        cl = unet.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, ctx)
        assert rel_err(ref, cl) <= 1e-5
    unet.train().set_grad_checkpointing(True)   # compile must trace through non-reentrant checkpointing
    compiled = torch.compile(unet, backend="aot_eager")
    torch._dynamo.reset()
    out = compiled(x, t, ctx)
    out.square().mean().backward()
    assert rel_err(ref, out.detach()) <= 1e-5


def test_odd_latent_sizes_upsample_to_skip_size():
    unet = _random_small().eval()
    with torch.no_grad():
        assert unet(torch.randn(1, 4, 20, 12), torch.tensor([5]), torch.randn(1, 3, 32)).shape == (1, 4, 20, 12)


# --- noise schedule --------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_matches_diffusers(schedule, zero_snr):
    ours = M.NoiseSchedule(beta_schedule=schedule, zero_terminal_snr=zero_snr, prediction_type="v_prediction")
    ref = DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-6, atol=1e-9)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    assert torch.allclose(ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(ours.target(x0, t, noise), ref.get_velocity(x0, noise, t), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_loss_weighting_matches_its_formula(prediction_type):
    """Each named weighting against its paper's formula, written from diffusers' alphas in float64: the x0-space
    weight divided by SNR (eps loss) or SNR + 1 (v loss); debiased as kohya's --debiased_estimation_loss."""
    from diffusers import DDPMScheduler
    abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    s = M.NoiseSchedule(prediction_type=prediction_type)
    t = torch.tensor([0, 1, 100, 300, 500, 750, 999])
    snr, gamma = abar[t] / (1 - abar[t]), 3.0
    space = snr if prediction_type == "epsilon" else snr + 1
    expected = {"none": torch.ones_like(snr),
                "min_snr": torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / space,
                "soft_min_snr": 1 / (1 / snr + 1 / gamma) / space,
                "debiased": (1 / snr.clamp(max=1000).sqrt() if prediction_type == "epsilon"
                             else 1 / (snr.clamp(max=1000) + 1))}
    assert set(expected) == set(M.LOSS_WEIGHTINGS)
    for name, want in expected.items():
        torch.testing.assert_close(s.loss_weight(t, name, gamma).double(), want, rtol=2e-5, atol=0, msg=name)
    # the soft form lies below the hard one and meets it far from SNR = gamma
    assert (s.loss_weight(t, "soft_min_snr", gamma) <= s.loss_weight(t, "min_snr", gamma) + 1e-7).all()
    with pytest.raises(M.UserError, match="unknown loss weighting 'snr'"):
        s.loss_weight(t, "snr", gamma)


def test_loss_weightings_are_finite_at_zero_terminal_snr():
    s = M.NoiseSchedule(prediction_type="v_prediction", zero_terminal_snr=True)
    t = torch.tensor([0, 500, 999])                  # SNR(999) = 0
    for name in M.LOSS_WEIGHTINGS:
        assert torch.isfinite(s.loss_weight(t, name, 5.0)).all(), name


# --- samplers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,eta", [("leading", 0.0), ("trailing", 0.0), ("leading", 0.7)])
def test_ddim_matches_diffusers_step_for_step(prediction, spacing, eta):
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, timestep_spacing=spacing, prediction_type=prediction)
    ref.set_timesteps(50)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref_traj, g = [], torch.Generator().manual_seed(42)
    xr = x.clone()
    for t in ref.timesteps:
        xr = ref.step(fake_model(xr, t), t, xr, eta=eta, generator=g).prev_sample
        ref_traj.append(xr)
    ours_traj = []
    M.sample_ddim(fake_model, x.clone(), M.NoiseSchedule(prediction_type=prediction), 50, eta=eta,
                  spacing=spacing, generator=torch.Generator().manual_seed(42),
                  callback=lambda i, t, xi, x0: ours_traj.append(xi))
    assert len(ours_traj) == 50
    assert max((a - b).abs().max().item() for a, b in zip(ref_traj, ours_traj)) <= 1e-5


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_matches_diffusers_step_for_step(prediction):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        steps_offset=1, prediction_type=prediction, variance_type="fixed_small")
    ref.set_timesteps(50)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g, xr = torch.Generator().manual_seed(7), x.clone()
    ref_traj = []
    for t in ref.timesteps:
        xr = ref.step(fake_model(xr, t), t, xr, generator=g).prev_sample
        ref_traj.append(xr)
    ours_traj = []
    M.sample_ddpm(fake_model, x.clone(), M.NoiseSchedule(prediction_type=prediction), 50,
                  generator=torch.Generator().manual_seed(7), callback=lambda i, t, xi, x0: ours_traj.append(xi))
    assert max((a - b).abs().max().item() for a, b in zip(ref_traj, ours_traj)) <= 1e-5


def test_sampling_timesteps_match_diffusers():
    for spacing in ("leading", "trailing", "linspace"):
        ref = DDIMScheduler(steps_offset=1, timestep_spacing=spacing)
        ref.set_timesteps(30)
        assert M.sampling_timesteps(M.NoiseSchedule(), 30, spacing) == ref.timesteps.tolist()
    assert M.sampling_timesteps(M.NoiseSchedule(), 50)[:2] == [981, 961]


def test_zero_terminal_snr_models_sample_from_pure_noise():
    """A zero-terminal-SNR model samples (and exports) with trailing spacing, whose first step is t = T - 1."""
    ztsnr = M.NoiseSchedule(prediction_type="v_prediction", zero_terminal_snr=True)
    assert M.Pipeline(None, None, None, ztsnr).spacing == "trailing"
    assert M.Pipeline(None, None, None, M.NoiseSchedule()).spacing == "leading"
    assert M.diffusers_scheduler_config(ztsnr)[1]["timestep_spacing"] == "trailing"
    assert M.sampling_timesteps(ztsnr, 25, M.default_spacing(ztsnr))[0] == 999
    assert ztsnr.alphas_cumprod[-1] == 0


def test_ddim_does_not_clamp_x0_by_default():
    """The seed's bug: pred_x0.clamp(-1, 1). SD latents routinely exceed 1; the default must keep them."""
    x = torch.full((1, 4, 2, 2), 3.0)
    seen = []
    M.sample_ddim(lambda x, t: torch.zeros_like(x), x, M.NoiseSchedule(), 5, callback=lambda i, t, xi, x0: seen.append(x0))
    assert seen[0].max() > 1.5
    clamped = []
    M.sample_ddim(lambda x, t: torch.zeros_like(x), x, M.NoiseSchedule(), 5, clip_x0=1.0,
                  callback=lambda i, t, xi, x0: clamped.append(x0))
    assert clamped[0].max() <= 1.0


# --- rectified flow --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 28])
@pytest.mark.parametrize("sampler", ["flow_euler", "flow_heun"])
def test_flow_samplers_match_diffusers_step_for_step(sampler, steps, shift):
    """sample_flow_euler / _heun against diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler
    (their sigma grid included): every step's latents within 1e-5 (Heun's intermediate Euler predictions are the
    scheduler's odd steps and not compared)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
    ref = (FlowMatchEulerDiscreteScheduler if sampler == "flow_euler" else FlowMatchHeunDiscreteScheduler)(shift=shift)
    ref.set_timesteps(steps)
    schedule = M.NoiseSchedule(prediction_type="flow", flow_shift=shift)
    ours_sigmas = M.flow_sigmas(schedule, steps)
    heun_sigmas = torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])                 # the scheduler repeats each one
    assert torch.equal(ours_sigmas, ref.sigmas if sampler == "flow_euler" else heun_sigmas)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    xr, ref_traj = x.clone(), []
    for i, t in enumerate(ref.timesteps):
        xr = ref.step(fake_model(xr, t), t, xr).prev_sample
        if sampler == "flow_euler" or i % 2 == 1 or i == len(ref.timesteps) - 1:
            ref_traj.append(xr)
    ours_traj, seen_t = [], []
    M.SAMPLERS[sampler](fake_model, x.clone(), schedule, steps,
                        callback=lambda i, t, xi, x0: (ours_traj.append(xi), seen_t.append(t)))
    assert len(ours_traj) == len(ref_traj) == steps
    assert max((a - b).abs().max().item() for a, b in zip(ref_traj, ours_traj)) <= 1e-5
    assert seen_t == ref.timesteps[::1 if sampler == "flow_euler" else 2].tolist()   # the UNet's 0..T input


def test_flow_forward_process_target_and_loss_weights_match_the_formula():
    """x = (1 - s) x0 + s noise, target noise - x0, s = t / T; each weighting is its x0-space weight times s^2 (the
    velocity loss weighs the x0 error by 1 / s^2), from SNR = ((1 - s) / s)^2 in float64; finite at s = 0 and 1."""
    s = M.NoiseSchedule(prediction_type="flow")
    t = torch.tensor([1.0, 37.5, 250.0, 500.0, 812.25, 999.0])
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    sig = (t.double() / 1000)[:, None, None, None]
    torch.testing.assert_close(s.q_sample(x0, t, noise).double(), (1 - sig) * x0.double() + sig * noise.double())
    torch.testing.assert_close(s.target(x0, t, noise), noise - x0)
    sig, gamma = t.double() / 1000, 3.0
    snr = ((1 - sig) / sig) ** 2
    w_x0 = {"none": 1 / sig ** 2, "min_snr": snr.clamp(max=gamma), "soft_min_snr": 1 / (1 / snr + 1 / gamma),
            "debiased": snr.sqrt().clamp(max=1000 ** 0.5)}
    for name, w in w_x0.items():
        # rtol: 1 - s in float32 near s = 1 (1 - 0.999 has 4 significant digits there)
        torch.testing.assert_close(s.loss_weight(t, name, gamma).double(), w * sig ** 2, rtol=1e-4, atol=0, msg=name)
        assert torch.isfinite(s.loss_weight(torch.tensor([0.0, 1000.0]), name, gamma)).all(), name
    with pytest.raises(M.UserError, match="a flow model reaches pure noise at t = T"):
        M.NoiseSchedule(prediction_type="flow", zero_terminal_snr=True)
    with pytest.raises(M.UserError, match="flow_shift and flow_logit_std must be positive"):
        M.NoiseSchedule(prediction_type="flow", flow_shift=0.0)
    with pytest.raises(M.UserError, match="unknown flow_t_density 'lognormal'"):
        M.NoiseSchedule(prediction_type="flow", flow_t_density="lognormal")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_sigmas_follow_the_logit_normal_and_the_shift(shift):
    """SD3's rf/lognorm(m, s): logit of the unshifted sigma is N(m, s) (mean and std within 4 standard errors over
    4000 per-sample Philox streams); uniform gives mean 1/2. t is a float on the 0..T scale."""
    import numpy as np
    n = 4000

    def draws(**kw):
        draw = M.NoiseSchedule(prediction_type="flow", flow_shift=shift, **kw).draw_train_t
        t = np.array([draw(np.random.Generator(np.random.Philox(counter=[0, i, 0, 0], key=[0, 0]))) for i in range(n)])
        sig = t / 1000
        assert isinstance(draw(np.random.default_rng(0)), float) and 0 < sig.min() and sig.max() <= 1
        return sig / (shift - (shift - 1) * sig)                 # time_shift undone
    logit = np.log(1 / draws(flow_logit_mean=0.5, flow_logit_std=0.8) - 1) * -1
    assert abs(logit.mean() - 0.5) < 4 * 0.8 / n ** 0.5 and abs(logit.std() - 0.8) < 4 * 0.8 / (2 * n) ** 0.5
    assert abs(draws(flow_t_density="uniform").mean() - 0.5) < 4 * (1 / 12) ** 0.5 / n ** 0.5
    assert M.time_shift(0.5, 3.0) == 0.75 and M.resolution_shift(512) == 2.0
    assert M.NoiseSchedule().draw_train_t(np.random.default_rng(0)) in range(1000)   # eps / v: DDPM's integers


def test_samplers_refuse_the_other_objective():
    flow, eps = M.NoiseSchedule(prediction_type="flow"), M.NoiseSchedule()
    assert M.default_sampler(flow) == "flow_euler" and M.default_sampler(eps) == "ddim"
    with pytest.raises(M.UserError, match=r"sampler 'ddim' does not fit this flow model; use one of \['flow_euler', "
                                          r"'flow_heun'\]"):
        M.check_sampler_fits("ddim", flow)
    with pytest.raises(M.UserError, match="sampler 'flow_heun' does not fit this epsilon model"):
        M.check_sampler_fits("flow_heun", eps)
    with pytest.raises(M.UserError, match="deterministic ODE solvers; eta must be 0"):
        M.sample_flow_euler(fake_model, torch.zeros(1, 4, 2, 2), flow, 2, eta=0.5)


def test_cfg_wrapper_formula_and_negative_prompt():
    unet = _random_small().eval()
    x = torch.randn(2, 4, 8, 8)
    cond, empty, negative = torch.randn(2, 7, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    t = torch.tensor([400, 400])
    with torch.no_grad():
        c, u = unet(x, t, cond), unet(x, t, empty)
        got = M.cfg_model_fn(unet, cond, empty, 7.5)(x, 400)
        assert torch.allclose(got, u + 7.5 * (c - u), atol=1e-5)
        assert not torch.allclose(got, M.cfg_model_fn(unet, cond, negative, 7.5)(x, 400), atol=1e-3)
        assert torch.allclose(M.cfg_model_fn(unet, cond, empty, 1.0)(x, 400), c, atol=1e-6)


# --- frozen VAE and text encoder -------------------------------------------------------------------------

def test_frozen_parts_load_locally_and_match_libraries(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel
    from tiny_models import save_tiny_clip, save_tiny_vae
    clip_dir, vae_dir = save_tiny_clip(tmp_path / "clip"), save_tiny_vae(tmp_path / "vae")
    te = M.FrozenTextEncoder(clip_dir)
    ids = te.tokenize(["a red circle on a gray background", ""])
    assert ids.shape == (2, 77) and ids[1, 0] == te.tokenizer.bos_token_id
    ref = CLIPTextModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    assert torch.equal(te.encode_ids(ids), out.last_hidden_state)
    pen = M.FrozenTextEncoder(clip_dir, layer="penultimate").encode_ids(ids)
    assert torch.allclose(pen, ref.final_layer_norm(out.hidden_states[-2]))
    vae = M.FrozenVAE(vae_dir)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean = AutoencoderKL.from_pretrained(vae_dir).encode(img).latent_dist.mean
    assert vae.scaling_factor == 0.18215
    assert torch.allclose(vae.encode(img), mean * 0.18215, atol=1e-6)
    assert vae.decode(vae.encode(img)).shape == img.shape


@pytest.mark.slow
def test_unreachable_hub_id_gives_one_clear_error(tmp_path):
    """Run offline with an empty cache (huggingface_hub reads HF_HUB_OFFLINE at import, hence a subprocess)."""
    code = ("import SD_Model as M\n"
            "for make in (lambda: M.FrozenVAE('stabilityai/sd-vae-ft-mse'), lambda: M.FrozenTextEncoder('./missing')):\n"
            "    try: make()\n"
            "    except M.UserError as e: print('ERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert "'stabilityai/sd-vae-ft-mse' is not in the local Hugging Face cache" in lines[0] and "--vae DIR" in lines[0]
    assert "text encoder folder './missing' does not exist" in lines[1] or "tokenizer folder './missing'" in lines[1]
    # online but the hub unreachable: one line at once, not huggingface_hub's minutes of retries (the timeout)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert "cannot reach http://127.0.0.1:9 to fetch VAE 'stabilityai/sd-vae-ft-mse'" in out.splitlines()[0], out


def test_a_folder_without_tokenizer_files_is_an_error_not_an_empty_tokenizer(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "te")
    with pytest.raises(M.UserError, match="has no tokenizer files"):   # transformers 5 returns a 2-token one
        M.load_tokenizer(tmp_path / "te")


def test_a_damaged_safetensors_file_is_one_line(tmp_path):
    good = tmp_path / "good.safetensors"
    M.save_unet(M.build_unet("small").state_dict(), "small", good)
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage header bytes")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:50_000])
    for name in ("garbage", "cut"):
        with pytest.raises(M.UserError, match=rf"'.*{name}.safetensors' is not a readable safetensors file"):
            M.read_unet_state(tmp_path / f"{name}.safetensors")
    sd = M.build_unet("small").state_dict()
    sd["conv_in.weight"] = sd["conv_in.weight"][:, :3]                         # right keys, a wrong shape
    with pytest.raises(M.UserError, match=r"1 wrong shapes \['conv_in.weight \(32, 3, 3, 3\) != \(32, 4, 3, 3\)'\]"):
        M.build_unet("small", sd)
