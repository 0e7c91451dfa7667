"""Tests import the flat top-level modules (SD_Model, sd_data, ...) from the repo root; helpers several test files
share."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fake_model(x, t):
    """A fixed nonlinear stand-in for the UNet in sampler tests: its output depends on x and on t (an int or float)."""
    t = float(t)
    return 0.3 * torch.tanh(x) * torch.cos(torch.tensor(t / 300.0)) + 0.1 * torch.sin(torch.tensor(t / 97.0))
