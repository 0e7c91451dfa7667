"""Tests import the flat top-level modules (SD_Model, sd_data, ...) from the repo root; what more than one test
module uses (a fixture, a reference drawing, the `--cuda-device` option) lives here."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A random StableDiffusionPipeline (SD1 topology) saved with save_pretrained (test_sampling, test_cuda)."""
    import SD_Model as M
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_models import save_tiny_clip, save_tiny_vae
    from transformers import CLIPTextModel, CLIPTokenizer
    root = tmp_path_factory.mktemp("pipe")
    clip, vae = save_tiny_clip(root / "clip"), save_tiny_vae(root / "vae")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(M.diffusers_config(M.unet_config("small"), sample_size=8))
    for name, p in unet.named_parameters():   # strong cross-attention so that prompts visibly matter
        torch.nn.init.normal_(p, std=1.0 if "attn2" in name else 0.1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae), text_encoder=CLIPTextModel.from_pretrained(clip),
        tokenizer=CLIPTokenizer.from_pretrained(clip), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    return root / "sd"


def pytest_addoption(parser):
    parser.addoption("--cuda-device", default="cuda",
                     help="device of the `cuda` tests (tests/test_cuda.py): cpu runs those that mean something on a "
                          "CPU, as bench/gpu_check.sh --cpu-dry rehearses them")


def diffusers_draw(folder, prompt, *, negative="", steps=10, guidance_scale=7.5, seed=0, size=64, single_file=None,
                   device="cpu", dtype=None, width=None):
    """One image drawn by diffusers' own StableDiffusionPipeline from a pipeline folder, as a user loads it: plain
    from_pretrained(folder) (torch_dtype=dtype, on `device`), or from_single_file(single_file, config=folder)
    offline. (H, W, 3) float64 levels; `size` x `size`, or `width` wide."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    if single_file:
        pipe = StableDiffusionPipeline.from_single_file(str(single_file), config=str(folder), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), **({"torch_dtype": dtype} if dtype else {}))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance_scale,
               height=size, width=width or size, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.float64)


def fake_model(x, t):
    """A fixed nonlinear stand-in for the UNet in sampler tests: its output depends on x and on t (an int or float)."""
    t = float(t)
    return 0.3 * torch.tanh(x) * torch.cos(torch.tensor(t / 300.0)) + 0.1 * torch.sin(torch.tensor(t / 97.0))
