"""Tests import the flat top-level modules (SD_Model, sd_data, ...) from the repo root; helpers several test files
share."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def diffusers_draw(folder, prompt, *, negative="", steps=10, guidance_scale=7.5, seed=0, size=64, single_file=None):
    """One image drawn by diffusers' own StableDiffusionPipeline from a pipeline folder, as a user loads it: plain
    from_pretrained(folder), or from_single_file(single_file, config=folder) offline. (H, W, 3) float64 levels."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    if single_file:
        pipe = StableDiffusionPipeline.from_single_file(str(single_file), config=str(folder), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance_scale,
               height=size, width=size, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.float64)


def fake_model(x, t):
    """A fixed nonlinear stand-in for the UNet in sampler tests: its output depends on x and on t (an int or float)."""
    t = float(t)
    return 0.3 * torch.tanh(x) * torch.cos(torch.tensor(t / 300.0)) + 0.1 * torch.sin(torch.tensor(t / 97.0))
