"""Stable Diffusion 1.x/2.x model core: the hand-written UNet, the noise schedule and samplers, the frozen
VAE and text encoder, and the checkpoint formats users bring and take (ours, diffusers, original, NeMo).

Reads top to bottom: timestep embedding -> ResBlock -> attention / transformer block -> Down/Upsample ->
UNet -> named configs -> noise schedule and samplers -> frozen VAE/CLIP -> checkpoint formats -> CLI.

Parameter names mirror diffusers' UNet2DConditionModel (down_blocks.0.resnets.0.conv1, ...), so a
diffusers folder loads with no renaming and parity with diffusers is a strict load_state_dict away; the
original CompVis layout (input_blocks.1.0.in_layers.2, ...) is one key map further down.
"""
import copy
import inspect
import json
import math
import pickle
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sd_common import HelpFormatter, UserError, arg_parser, atomic_folder, atomic_path, pick_dtype, run_main


#################################################################################
#                               Embedding Layers                                #
#################################################################################

def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """Sinusoidal timestep features as SD / diffusers' get_timestep_embedding: frequencies
    exp(-ln(max_period) * i / (half - shift)); SD uses [cos, sin] order (flip) and shift 0."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))                           # (half,)
    args = t.float()[:, None] * freqs[None]                                     # (N, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)                 # (N, dim)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP lifting the sinusoidal features to the time-embedding width (4 x model channels)."""

    def __init__(self, in_dim, time_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


#################################################################################
#                                  Res Blocks                                   #
#################################################################################

class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected time embedding, -> GroupNorm -> SiLU -> dropout -> conv,
    added to a (1x1-conv when channels change) skip."""

    def __init__(self, in_ch, out_ch, time_dim, groups=32, eps=1e-5, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))                                   # (N, out, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


#################################################################################
#                          Attention / Transformer Blocks                       #
#################################################################################

class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on
    CUDA; entry scripts pick the backends once, see configure_cuda_backends)."""

    def __init__(self, dim, heads, head_dim, context_dim=None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])  # list: diffusers' key names

    def forward(self, x, context=None):
        context = x if context is None else context
        N, L, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)        # (N, L|S, heads*d)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))  # (N, h, L|S, d)
        out = F.scaled_dot_product_attention(q, k, v)                          # (N, h, L, d)
        out = out.transpose(1, 2).reshape(N, L, -1)                            # (N, L, h*d)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020): value * gelu(gate), both from one projection."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text context, and GEGLU feed-forward."""

    def __init__(self, dim, heads, head_dim, context_dim, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))                                      # (N, HW, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> transformer blocks -> image features, with a residual around it all.
    SD1 projects in/out with 1x1 convs, SD2 with linears on the token sequence."""

    def __init__(self, ch, heads, context_dim, depth=1, groups=32, linear_proj=False, dropout=0.0):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        proj = (lambda: nn.Linear(ch, ch)) if linear_proj else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(ch, heads, ch // heads, context_dim, dropout) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, context, grad_ckpt=False):
        N, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_proj:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(N, H * W, C))       # (N, HW, C)
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(N, H * W, C)       # (N, HW, C)
        for block in self.transformer_blocks:
            h = _maybe_checkpoint(block, grad_ckpt, h, context)
        # Back to x's memory format: a permuted (N, H, W, C) view is channels_last in disguise, and feeding
        # one to the convs of a contiguous model makes oneDNN/cuDNN convert layouts at every layer.
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if self.linear_proj:
            h = self.proj_out(h).reshape(N, H, W, C).permute(0, 3, 1, 2)       # (N, C, H, W)
        else:
            h = self.proj_out(h.reshape(N, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=fmt))
        return x + h.contiguous(memory_format=fmt)


def _maybe_checkpoint(module, enabled, *args):
    """Recompute `module` in backward instead of storing its activations (the seed's ~40% VRAM saving);
    non-reentrant so it composes with DDP, torch.compile and inputs that need no grad."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


#################################################################################
#                              Down / Up Sampling                               #
#################################################################################

class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # Upsampling to the skip's size (not always 2x) keeps odd latent sizes working.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


#################################################################################
#                                    UNet                                       #
#################################################################################

@dataclass
class UNetConfig:
    """Everything needed to rebuild the UNet; travels inside every checkpoint."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_stages: tuple = (True, True, True, False)   # stages with a SpatialTransformer after each ResBlock
    num_heads: tuple = (8, 8, 8, 8)                   # per stage; the middle block uses the last stage's
    transformer_depth: tuple = (1, 1, 1, 1)           # transformer blocks per SpatialTransformer, per stage
    context_dim: int = 768
    linear_proj: bool = False                        # SD2: linear proj_in/proj_out instead of 1x1 convs
    norm_groups: int = 32
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("channel_mult", "attn_stages", "num_heads", "transformer_depth"):
            setattr(self, name, tuple(getattr(self, name)))
        n = len(self.channel_mult)
        if not all(len(getattr(self, k)) == n for k in ("attn_stages", "num_heads", "transformer_depth")):
            raise UserError(f"UNetConfig: attn_stages, num_heads and transformer_depth need {n} entries")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"UNetConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


class UNet(nn.Module):
    """The SD text-conditional UNet: forward(x, t, context) -> eps / v / flow-velocity prediction, shaped like x."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg                             # the UNetConfig, saved in every checkpoint
        self.grad_ckpt = False
        ch0 = cfg.model_channels
        time_dim = ch0 * 4
        chans = [ch0 * m for m in cfg.channel_mult]
        n = len(chans)
        res = dict(time_dim=time_dim, groups=cfg.norm_groups, dropout=cfg.dropout)

        def attn(ch, stage):
            return SpatialTransformer(ch, cfg.num_heads[stage], cfg.context_dim, cfg.transformer_depth[stage],
                                      cfg.norm_groups, cfg.linear_proj, cfg.dropout)

        self.time_embedding = TimestepEmbedding(ch0, time_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        # Encoder: record every feature map's channels; the decoder consumes them in reverse as skips.
        skip_chans = [ch0]
        self.down_blocks = nn.ModuleList()
        ch = ch0
        for i, out_ch in enumerate(chans):
            block = nn.Module()
            block.resnets = nn.ModuleList()
            block.attentions = nn.ModuleList() if cfg.attn_stages[i] else None
            for _ in range(cfg.num_res_blocks):
                block.resnets.append(ResBlock(ch, out_ch, **res))
                ch = out_ch
                if cfg.attn_stages[i]:
                    block.attentions.append(attn(ch, i))
                skip_chans.append(ch)
            block.downsamplers = nn.ModuleList([Downsample(ch)]) if i < n - 1 else None
            if i < n - 1:
                skip_chans.append(ch)
            self.down_blocks.append(block)

        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([ResBlock(ch, ch, **res), ResBlock(ch, ch, **res)])
        self.mid_block.attentions = nn.ModuleList([attn(ch, n - 1)])

        # Decoder: one more ResBlock per stage than the encoder, each eating one skip.
        self.up_blocks = nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(chans))):
            block = nn.Module()
            block.resnets = nn.ModuleList()
            block.attentions = nn.ModuleList() if cfg.attn_stages[i] else None
            for _ in range(cfg.num_res_blocks + 1):
                block.resnets.append(ResBlock(ch + skip_chans.pop(), out_ch, **res))
                ch = out_ch
                if cfg.attn_stages[i]:
                    block.attentions.append(attn(ch, i))
            block.upsamplers = nn.ModuleList([Upsample(ch)]) if i > 0 else None
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def initialize_weights(self):
        """From-scratch init: default PyTorch init everywhere, then zero every output projection so each
        residual branch starts as the identity and the UNet starts by predicting 0 (as the seed)."""
        zero = [self.conv_out]
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero.append(m.conv2)
            elif isinstance(m, Attention):
                zero.append(m.to_out[0])
            elif isinstance(m, FeedForward):
                zero.append(m.net[2])
            elif isinstance(m, SpatialTransformer):
                zero.append(m.proj_out)
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        return self

    def set_grad_checkpointing(self, enabled=True):
        self.grad_ckpt = enabled
        return self

    def forward(self, x, t, context):
        ckpt = self.grad_ckpt and self.training
        t = t.reshape(-1).expand(x.shape[0])                                   # scalar or (N,) -> (N,)
        temb = timestep_embedding(t, self.config.model_channels, self.config.flip_sin_to_cos, self.config.freq_shift)
        temb = self.time_embedding(temb.to(x.dtype))                           # (N, 4*C0)

        h = self.conv_in(x)                                                    # (N, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = _maybe_checkpoint(resnet, ckpt, h, temb)
                if block.attentions is not None:
                    h = block.attentions[j](h, context, ckpt)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)                                   # (N, C, H/2, W/2)
                skips.append(h)

        h = _maybe_checkpoint(self.mid_block.resnets[0], ckpt, h, temb)
        h = self.mid_block.attentions[0](h, context, ckpt)
        h = _maybe_checkpoint(self.mid_block.resnets[1], ckpt, h, temb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)                         # (N, C + C_skip, H, W)
                h = _maybe_checkpoint(resnet, ckpt, h, temb)
                if block.attentions is not None:
                    h = block.attentions[j](h, context, ckpt)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h, skips[-1].shape[-2:])               # (N, C, 2H, 2W)

        return self.conv_out(F.silu(self.conv_norm_out(h)))                   # (N, out, H, W)


#################################################################################
#                                Named Configs                                  #
#################################################################################

def _sd1(**kw):
    return UNetConfig(**kw)


def _sd2(**kw):
    # SD2 fixes the head *width* at 64, so heads grow with channels: 5, 10, 20, 20.
    return UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, **kw)


def _small(**kw):
    """Test-sized SD1 topology: every block kind, tiny widths (groups of 8)."""
    return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attn_stages=(True, True, False),
                      num_heads=(2, 2, 2), transformer_depth=(1, 1, 1), context_dim=32, norm_groups=8, **kw)


def _small_sd2(**kw):
    return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attn_stages=(True, True, False),
                      num_heads=(1, 2, 2), transformer_depth=(1, 1, 1), context_dim=48, norm_groups=8,
                      linear_proj=True, **kw)


def _demo(**kw):
    """The `make demo` model (1.7M parameters): learns colored shapes on 2 CPU cores in minutes. One ResBlock per
    level instead of SD's two: twice the images/s on CPU, and after the same 52k images it followed the prompts
    better (color 0.95 / shape 0.77 against 0.91 / 0.72)."""
    return UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_stages=(False, True, True),
                      num_heads=(2, 4, 4), transformer_depth=(1, 1, 1), context_dim=64, norm_groups=8, **kw)


UNET_CONFIGS = {"sd1": _sd1, "sd2": _sd2, "small": _small, "small_sd2": _small_sd2, "demo": _demo}


def unet_config(name_or_dict):
    """A UNetConfig from a preset name or a dict (a checkpoint's stored config)."""
    if isinstance(name_or_dict, UNetConfig):
        return name_or_dict
    if isinstance(name_or_dict, dict):
        return UNetConfig.from_dict(name_or_dict)
    if name_or_dict not in UNET_CONFIGS:
        raise UserError(f"unknown UNet config '{name_or_dict}'; choose one of {sorted(UNET_CONFIGS)}")
    return UNET_CONFIGS[name_or_dict]()


#################################################################################
#                          Noise Schedule and Samplers                          #
#################################################################################

@dataclass
class NoiseSchedule:
    """The forward process and the UNet's target in one place: training, validation and sampling all read them
    from here, and every checkpoint records them (to_dict).
      epsilon / v_prediction  the DDPM forward process (Ho et al. 2020) on integer t in [0, T): alphas_cumprod
                              follows diffusers' DDPMScheduler in float32, step for step
      flow                    rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x = (1 - s) x0 + s noise on
                              the straight path, s = t / T in [0, 1], target the velocity noise - x0. t stays on
                              the 0..T scale (float), which is also the UNet's timestep input, as SD3 feeds it."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"              # scaled_linear | linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"                  # epsilon | v_prediction | flow
    zero_terminal_snr: bool = False                  # Lin et al. 2023, "Common Diffusion Noise Schedules..."
    flow_shift: float = 1.0                          # flow: time_shift of training and sampling sigmas (1 = none)
    flow_t_density: str = "logit_normal"             # flow: density of training sigmas (SD3's rf/lognorm)
    flow_logit_mean: float = 0.0                     # flow: logit_normal's m and s (SD3's best: 0, 1)
    flow_logit_std: float = 1.0
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    _on_device: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    CHOICES = {"beta_schedule": ("scaled_linear", "linear", "squaredcos_cap_v2"),
               "prediction_type": ("epsilon", "v_prediction", "flow"),
               "flow_t_density": ("logit_normal", "uniform")}

    def to_dict(self):
        """The settings that define the schedule (what checkpoints and exports record)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d):
        """A schedule from any dict holding its settings (a run config, a checkpoint's meta); other keys ignored."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.init and f.name in d})

    def __post_init__(self):
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float32) ** 2
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine alpha_bar
            abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                                 dtype=torch.float32)
        else:
            raise UserError(f"unknown beta_schedule '{self.beta_schedule}'; choose one of "
                            f"{self.CHOICES['beta_schedule']}")
        for name in ("prediction_type", "flow_t_density"):
            if getattr(self, name) not in self.CHOICES[name]:
                raise UserError(f"unknown {name} '{getattr(self, name)}'; choose one of {self.CHOICES[name]}")
        if self.flow and self.zero_terminal_snr:
            raise UserError("zero_terminal_snr rescales DDPM betas; a flow model reaches pure noise at t = T by "
                            "construction: leave it false")
        if not (self.flow_shift > 0 and self.flow_logit_std > 0):
            raise UserError(f"flow_shift and flow_logit_std must be positive (got {self.flow_shift}, "
                            f"{self.flow_logit_std})")
        if self.zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @property
    def flow(self):
        return self.prediction_type == "flow"

    @property
    def t_dtype(self):
        """Training timesteps' dtype: a flow model's t is continuous, DDPM's an index into alphas_cumprod."""
        return torch.float32 if self.flow else torch.long

    def draw_train_t(self, rng):
        """One training timestep from a numpy Generator (sd_latents.sample_randomness's per-sample stream):
        uniform over DDPM's T integers, or for flow a sigma from flow_t_density (SD3's logit-normal: the sigmoid
        of a normal draw; or uniform), shifted by flow_shift, on the 0..T scale."""
        if not self.flow:
            return rng.integers(0, self.num_train_timesteps)
        if self.flow_t_density == "logit_normal":   # sigmoid(z) as (1 + tanh(z / 2)) / 2: no overflow at any z
            sigma = 0.5 * (1 + math.tanh((self.flow_logit_mean + self.flow_logit_std * rng.standard_normal()) / 2))
        else:
            sigma = 1.0 - rng.random()              # (0, 1]: sigma = 0 would make the SNR infinite
        return self.num_train_timesteps * time_shift(sigma, self.flow_shift)

    def _table(self, device):
        """alphas_cumprod on `device`, copied there once: a CPU -> GPU copy at every training step would be a
        host sync at every step."""
        if device not in self._on_device:
            self._on_device[device] = self.alphas_cumprod.to(device)
        return self._on_device[device]

    def _at(self, t, like):
        """alpha_bar_t gathered for a batch of timesteps, shaped to broadcast against `like`."""
        a = self._table(like.device)[t.to(like.device)].float()
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def _sigma(self, t, like=None):
        """A flow model's sigma = t / T, shaped to broadcast against `like` when given."""
        s = t.float() / self.num_train_timesteps
        return s if like is None else s.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; flow: (1 - sigma) x0 + sigma noise."""
        if self.flow:
            s = self._sigma(t, x0)
            return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)
        a = self._at(t, x0)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def target(self, x0, t, noise):
        """What the UNet learns to predict: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), or
        the flow's velocity noise - x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.flow:
            return (noise.float() - x0.float()).to(x0.dtype)
        a = self._at(t, x0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)

    def snr(self, t):
        if self.flow:
            s = self._sigma(t)
            return ((1 - s) / s) ** 2
        a = self._table(t.device)[t]
        return a / (1 - a)

    def loss_weight(self, t, weighting, gamma=5.0):
        """Per-sample weight of the MSE to self.target, one of LOSS_WEIGHTINGS. Each is written as a weight on the
        x0 error (w_x0) and carried into this schedule's target space: the eps loss already weighs the x0 error by
        SNR, the v loss by SNR + 1, the flow loss by 1 / sigma^2, so the weight here is w_x0 / SNR, w_x0 / (SNR + 1)
        or w_x0 sigma^2.
          none          1 (plain loss of the target: SD's and NeMo's; for flow SD3's, whose weighting is the
                        density its sigmas are drawn from, flow_t_density)
          min_snr       w_x0 = min(SNR, gamma) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR")
          soft_min_snr  w_x0 = SNR gamma / (SNR + gamma), the smooth minimum of SNR and gamma (Crowson et al.
                        2024, HDiT): no kink at SNR = gamma
          debiased      1 / sqrt(SNR) for eps, 1 / (SNR + 1) for v, SNR capped at 1000 (Yu et al. 2024, "Debias
                        the Training of Diffusion Models"; kohya's --debiased_estimation_loss); flow carries the
                        paper's eps form over: w_x0 = sqrt(SNR)"""
        if weighting not in LOSS_WEIGHTINGS:
            raise UserError(f"unknown loss weighting '{weighting}'; choose one of {list(LOSS_WEIGHTINGS)}")
        if self.flow:
            return self._flow_loss_weight(t, weighting, gamma)
        snr = self.snr(t).float()
        if weighting == "none":
            return torch.ones_like(snr)
        v = self.prediction_type == "v_prediction"
        if weighting == "debiased":
            snr = snr.clamp(max=1000.0)
            return 1 / (snr + 1) if v else snr.rsqrt()
        if weighting == "min_snr":
            if not v:   # = min(SNR, gamma) / SNR, written so that SNR = 0 (zero terminal SNR) gives 1, not 0/0
                return torch.clamp(gamma / snr, max=1.0)
            return torch.clamp(snr, max=gamma) / (snr + 1)
        # soft_min_snr: gamma / (SNR + gamma) in eps space, finite at SNR = 0 and SNR = inf
        return gamma / (snr + gamma) if not v else snr * gamma / ((snr + gamma) * (snr + 1))

    def _flow_loss_weight(self, t, weighting, gamma):
        """w_x0 sigma^2 with SNR = ((1 - s) / s)^2, written in s so that s = 0 and s = 1 stay finite."""
        s = self._sigma(t)
        if weighting == "none":
            return torch.ones_like(s)
        if weighting == "min_snr":                   # min(SNR, gamma) s^2
            return torch.minimum((1 - s) ** 2, gamma * s ** 2)
        if weighting == "soft_min_snr":              # SNR gamma / (SNR + gamma) s^2
            return gamma * (1 - s) ** 2 * s ** 2 / ((1 - s) ** 2 + gamma * s ** 2)
        return s * torch.minimum(1 - s, 1000.0 ** 0.5 * s)   # debiased: min(sqrt(SNR), sqrt(1000)) s^2

    def predict_x0_eps(self, model_out, x, t):
        """(x0, eps) implied by the model output at timestep t (a python int or 0-dim tensor). alpha_bar_t stays a
        0-dim CPU tensor, which enters CUDA kernels as a scalar: a copy to the GPU per step would sync the host."""
        a = self.alphas_cumprod[t]
        b = 1 - a
        if self.prediction_type == "epsilon":
            return (x - b ** 0.5 * model_out) / a ** 0.5, model_out
        return a ** 0.5 * x - b ** 0.5 * model_out, a ** 0.5 * model_out + b ** 0.5 * x


LOSS_WEIGHTINGS = ("none", "min_snr", "soft_min_snr", "debiased")


def _rescale_zero_terminal_snr(betas):
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, Algorithm 1)."""
    abar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def sampling_timesteps(schedule, steps, spacing="leading", steps_offset=1):
    """The descending timesteps a sampler visits, as diffusers' set_timesteps. SD's own configs use
    `leading` with steps_offset=1 (t = 981, 961, ..., 1 for 50 steps); `trailing` reaches t = T-1."""
    T = schedule.num_train_timesteps
    if spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise UserError(f"unknown timestep spacing '{spacing}'; choose leading, trailing or linspace")
    return [int(t) for t in ts]


def _noise_like(x, generator):
    """Fresh N(0, 1) noise of x's shape, drawn on the generator's device (diffusers' randn_tensor): a CPU
    generator gives the same noise whatever device samples."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype,
                       device=generator.device if generator is not None else x.device).to(x.device)


# Every sampler is a pure function with one signature:
#   sample_X(model_fn, x, schedule, steps, *, eta, spacing, steps_offset, generator, clip_x0, callback)
# where model_fn(x, t) -> the raw model output at timestep t (an int, or a float for Euler's linspace spacing),
# and callback(i, t, x, x0) sees every step. The initial noise x ~ N(0, 1) is the caller's, so seeds are the
# caller's too; a sampler that adds no noise (DPM-Solver++) takes no eta.

@torch.no_grad()
def sample_ddim(model_fn, x, schedule, steps=50, *, eta=0.0, spacing="leading", steps_offset=1,
                generator=None, clip_x0=None, final_alpha_one=False, callback=None):
    """Implements DDIM (Song et al. 2021, Eq. 12), equal step for step to diffusers' DDIMScheduler.
    No x0 clamp unless `clip_x0` is given: SD latents have std ~1 after scaling but reach |x| > 1 often,
    and the seed's pred_x0.clamp(-1, 1) in its training-time validation was a bug."""
    T = schedule.num_train_timesteps
    ac = schedule.alphas_cumprod
    final = torch.tensor(1.0) if final_alpha_one else ac[0]
    for i, t in enumerate(sampling_timesteps(schedule, steps, spacing, steps_offset)):
        out = model_fn(x, t)
        x0, eps = schedule.predict_x0_eps(out, x, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        prev = t - T // steps
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else final)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _noise_like(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(model_fn, x, schedule, steps=50, *, eta=1.0, spacing="leading", steps_offset=1,
                generator=None, clip_x0=None, callback=None):
    """Implements ancestral sampling (Ho et al. 2020, Algorithm 2) with the posterior mean and the
    'fixed_small' variance, equal step for step to diffusers' DDPMScheduler; eta scales the noise."""
    ac = schedule.alphas_cumprod
    ts = sampling_timesteps(schedule, steps, spacing, steps_offset)
    for i, t in enumerate(ts):
        out = model_fn(x, t)
        x0, _ = schedule.predict_x0_eps(out, x, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else torch.tensor(1.0))
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        x = (a_prev ** 0.5 * beta_t / (1 - a_t)) * x0 + (alpha_t ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if t > 0 and eta > 0:
            var = torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
            x = x + eta * var ** 0.5 * _noise_like(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# The sigma-space samplers below (Karras et al. 2022) write x_t = sqrt(abar) (x0 + sigma eps) with
# sigma = sqrt((1 - abar) / abar). Euler works on x_sigma = x0 + sigma eps and hands the model
# x_sigma / sqrt(sigma^2 + 1), the x_t it was trained on (diffusers' scale_model_input); DPM-Solver works on x_t
# itself and reads sigma only for its step sizes. Both follow diffusers' float32 arithmetic op for op.

def train_sigmas(schedule):
    """sigma of every training timestep. A zero-terminal-SNR schedule has abar_T = 0, sigma_T = inf: diffusers clamps
    abar_T to 2**-24 (fp16's smallest subnormal) for these samplers, so sigma_T ~ 4096 and the model still sees
    x_sigma / sqrt(sigma^2 + 1), pure noise."""
    abar = schedule.alphas_cumprod.clone()
    if schedule.zero_terminal_snr:
        abar[-1] = 2.0 ** -24
    return ((1 - abar) / abar) ** 0.5


def sigma_steps(schedule, steps, spacing="leading", steps_offset=1, solver="euler", karras=False):
    """(timesteps, sigmas) a sigma-space sampler visits, as diffusers' set_timesteps makes them: `steps` timesteps
    and steps + 1 float32 sigmas ending at 0.
      euler  EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: the spacing's timesteps (linspace's left
             fractional), sigma interpolated at each
      dpm    DPMSolverMultistepScheduler: leading and linspace space steps + 1 points and drop t = 0 (the solver
             steps to sigma = 0 itself); karras=True puts Karras et al.'s sigmas (rho = 7, Eq. 5) between the
             schedule's extremes and calls the model at the timestep of equal log sigma, rounded"""
    T = schedule.num_train_timesteps
    full = train_sigmas(schedule).numpy()
    if solver == "euler":
        ts = (np.linspace(0, T - 1, steps, dtype=np.float32)[::-1] if spacing == "linspace" else
              np.array(sampling_timesteps(schedule, steps, spacing, steps_offset), dtype=np.float32))
    else:
        ts = np.array(sampling_timesteps(schedule, steps, spacing, steps_offset) if spacing == "trailing" else
                      sampling_timesteps(schedule, steps + 1, spacing, steps_offset)[:-1])
    if karras:
        rho, lo, hi = 7.0, full[0].item(), full[-1].item()
        sigmas = (hi ** (1 / rho) + np.linspace(0, 1, steps) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        ts = np.interp(np.log(sigmas), np.log(full), np.arange(T))
        if schedule.beta_schedule != "squaredcos_cap_v2":      # diffusers truncates the cosine schedule's instead
            ts = ts.round()
    else:
        sigmas = np.interp(ts, np.arange(T), full)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return [float(t) if solver == "euler" else int(t) for t in ts], sigmas


@torch.no_grad()
def sample_euler(model_fn, x, schedule, steps=50, *, eta=0.0, spacing="leading", steps_offset=1, generator=None,
                 clip_x0=None, callback=None):
    """Implements Euler steps in sigma (Karras et al. 2022, Algorithm 2 without churn), equal step for step to
    diffusers' EulerDiscreteScheduler. eta > 0 makes it ancestral as k-diffusion's sample_euler_ancestral: step down
    to sigma_down, then add noise of std sigma_up (sigma_down^2 + sigma_up^2 = the next sigma^2); eta = 1 is
    diffusers' EulerAncestralDiscreteScheduler."""
    ts, sigmas = sigma_steps(schedule, steps, spacing, steps_offset, "euler")
    # diffusers' init_noise_sigma: x_T as x_sigma, sqrt(sigma_0^2 + 1) x_T, for leading spacing; k-diffusion's
    # sigma_0 x_T for the others
    x = x * (sigmas.max() if spacing != "leading" else (sigmas.max() ** 2 + 1) ** 0.5)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = model_fn(x / (sigma ** 2 + 1) ** 0.5, t)
        if schedule.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            x0 = out * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        sigma_up = torch.minimum(sigma_next,
                                 eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if eta > 0:
            x = x + _noise_like(x, generator) * sigma_up
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_euler_ancestral(model_fn, x, schedule, steps=50, *, eta=1.0, **kw):
    """Euler ancestral: sample_euler with eta = 1 by default, diffusers' EulerAncestralDiscreteScheduler."""
    return sample_euler(model_fn, x, schedule, steps, eta=eta, **kw)


@torch.no_grad()
def sample_dpmpp_2m(model_fn, x, schedule, steps=50, *, spacing="leading", steps_offset=1, generator=None,
                    clip_x0=None, karras=False, callback=None):
    """Implements DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: multistep, second order, on the x0 prediction),
    equal step for step to diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    with its defaults: first order on the first step (no history) and the last (to sigma = 0, where it returns
    the x0 prediction). Deterministic: no eta. `generator` is unused, kept for the shared signature."""
    ts, sigmas = sigma_steps(schedule, steps, spacing, steps_offset, "dpm", karras)
    alphas = 1 / (sigmas ** 2 + 1) ** 0.5                   # sqrt(abar)
    stds = sigmas * alphas                                   # sqrt(1 - abar)
    lambdas = torch.log(alphas) - torch.log(stds)            # half the log-SNR: +inf at sigma = 0
    x0_prev = None
    for i, t in enumerate(ts):
        out = model_fn(x, t)
        if schedule.prediction_type == "epsilon":
            x0 = (x - stds[i] * out) / alphas[i]
        else:
            x0 = alphas[i] * x - stds[i] * out
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        h = lambdas[i + 1] - lambdas[i]
        step = alphas[i + 1] * (torch.exp(-h) - 1.0)
        x = (stds[i + 1] / stds[i]) * x - step * x0         # first order: DDIM (Lu et al. 2022, Eq. 9)
        if x0_prev is not None and i < len(ts) - 1:          # second order from the previous x0 (their Eq. 17)
            r = (lambdas[i] - lambdas[i - 1]) / h
            x = x - 0.5 * step * ((1.0 / r) * (x0 - x0_prev))
        x0_prev = x0
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_dpmpp_2m_karras(model_fn, x, schedule, steps=50, **kw):
    """DPM-Solver++(2M) on Karras et al.'s sigmas (the UIs' 'DPM++ 2M Karras'), diffusers'
    DPMSolverMultistepScheduler(use_karras_sigmas=True)."""
    return sample_dpmpp_2m(model_fn, x, schedule, steps, karras=True, **kw)


# The names users know from the UIs and diffusers; the first is the default.
SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm, "euler": sample_euler, "euler_a": sample_euler_ancestral,
            "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_karras": sample_dpmpp_2m_karras}


# --- Rectified-flow samplers (prediction_type flow) -------------------------------------------------------
# A flow model predicts the velocity v = noise - x0 of the straight path x = (1 - s) x0 + s noise (Liu et al. 2022;
# SD3, Esser et al. 2024), so sampling integrates dx/ds = v from s = 1 (pure noise) down to s = 0. The UNet sees
# s on the 0..T scale (t = s T), as in training. Same signature as the samplers above; spacing and steps_offset
# belong to DDPM's integer timesteps and are unused here.

def time_shift(sigma, shift):
    """SD3's timestep shift (Esser et al. 2024, eq. 23): s -> shift s / (1 + (shift - 1) s). shift > 1 spends more
    of training and sampling at high noise, which larger images need (more pixels, more redundancy to destroy)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(resolution, base=256):
    """SD3's resolution-dependent shift sqrt(m / n) for m = resolution^2 pixels and its base n = 256^2 (sec. 5.3.2):
    2 at 512 px, 4 at 1024 px (SD3 itself settled on 3.0 there)."""
    return resolution / base


def flow_sigmas(schedule, steps):
    """The steps + 1 descending sigmas a flow sampler visits, ending at 0, as diffusers'
    FlowMatchEulerDiscreteScheduler(shift).set_timesteps makes them: a linspace from 1 to its smallest training
    sigma (1 / T, already shifted once), shifted again, in float32."""
    T, shift = schedule.num_train_timesteps, schedule.flow_shift
    sigma_min = time_shift(torch.ones(1) / T, shift).item()                  # float32, as the scheduler's init
    sigmas = time_shift(np.linspace(T, sigma_min * T, steps) / T, shift)       # float64, as its set_timesteps
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def _flow_velocity(model_fn, x, sigma, T, clip_x0):
    """The model's velocity at sigma (UNet timestep sigma T, float32 as diffusers passes it), and the x0 it implies
    (clamped when clip_x0 is given, the velocity then recomputed from the clamped x0)."""
    v = model_fn(x, float(sigma * T)).float()
    x0 = x.float() - sigma * v
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        v = (x.float() - x0) / sigma
    return v, x0


def _deterministic(eta):
    if eta:
        raise UserError(f"the flow samplers are deterministic ODE solvers; eta must be 0, got {eta}")


@torch.no_grad()
def sample_flow_euler(model_fn, x, schedule, steps=28, *, eta=0.0, spacing=None, steps_offset=None, generator=None,
                      clip_x0=None, callback=None):
    """Implements Euler steps of the flow ODE dx/ds = v (SD3's sampler), equal step for step to diffusers'
    FlowMatchEulerDiscreteScheduler."""
    _deterministic(eta)
    sigmas = flow_sigmas(schedule, steps)
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        v, x0 = _flow_velocity(model_fn, x, s, schedule.num_train_timesteps, clip_x0)
        x = x.float() + (s_next - s) * v
        if callback is not None:
            callback(i, float(s * schedule.num_train_timesteps), x, x0)
    return x


@torch.no_grad()
def sample_flow_heun(model_fn, x, schedule, steps=28, *, eta=0.0, spacing=None, steps_offset=None, generator=None,
                     clip_x0=None, callback=None):
    """Implements Heun steps (Karras et al. 2022, Algorithm 1) on the flow's sigmas, slopes written from the
    denoised x0 as d = (x - x0) / s: an Euler predictor, then the mean of both slopes; the last step, to s = 0,
    stays Euler (2 x steps - 1 model calls). Equal step for step to diffusers' FlowMatchHeunDiscreteScheduler."""
    _deterministic(eta)
    sigmas, T = flow_sigmas(schedule, steps), schedule.num_train_timesteps
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        _, x0 = _flow_velocity(model_fn, x, s, T, clip_x0)
        d = (x.float() - x0) / s
        x_euler = x.float() + (s_next - s) * d
        if s_next > 0:
            _, x0 = _flow_velocity(model_fn, x_euler, s_next, T, clip_x0)
            x = x.float() + (s_next - s) * (d + (x_euler - x0) / s_next) / 2
        else:
            x = x_euler
        if callback is not None:
            callback(i, float(s * T), x, x0)
    return x


FLOW_SAMPLERS = {"flow_euler": sample_flow_euler, "flow_heun": sample_flow_heun}
SAMPLERS.update(FLOW_SAMPLERS)


def default_sampler(schedule):
    """The sampler a checkpoint samples with unless told otherwise: DDIM, or flow Euler for a flow model."""
    return "flow_euler" if schedule.flow else "ddim"


def sampler_fits(sampler, flow):
    """A DDPM-family sampler cannot run a flow model, nor a flow sampler an eps / v one."""
    return (sampler in FLOW_SAMPLERS) == flow


def check_sampler_fits(sampler, schedule):
    """sampler_fits for a loaded model: one line, not noise."""
    if not sampler_fits(sampler, schedule.flow):
        fits = sorted(FLOW_SAMPLERS) if schedule.flow else sorted(set(SAMPLERS) - set(FLOW_SAMPLERS))
        raise UserError(f"sampler '{sampler}' does not fit this {schedule.prediction_type} model; use one of {fits}")


def cfg_model_fn(unet, cond, uncond, scale):
    """Classifier-free guidance (Ho & Salimans 2022) as one wrapper: the unconditional branch runs on
    `uncond`, which is the empty prompt's or the negative prompt's embedding. Both branches share one
    batched forward."""
    context = cond if scale == 1.0 else torch.cat([uncond, cond])   # scale 1 is plain conditional sampling

    def model_fn(x, t):
        xx = x if scale == 1.0 else torch.cat([x, x])
        out = unet(xx.to(context.dtype), torch.full((xx.shape[0],), t, device=x.device), context).float()
        if scale == 1.0:
            return out
        out_u, out_c = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    return model_fn


#################################################################################
#                         Frozen VAE and Text Encoder                           #
#################################################################################

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DEFAULT_TEXT_ENCODER = {"sd1": "openai/clip-vit-large-patch14",
                        "sd2": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}


def require_hub(what, name, hint):
    """Called when `name` must come from the Hugging Face hub: a one-line error at once when it cannot be
    reached, where huggingface_hub would retry every file for minutes (measured: 4 min for one tokenizer)
    before failing. Any HTTP answer counts as reachable."""
    import urllib.error
    import urllib.request
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{what} '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=10).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot reach {constants.ENDPOINT} to fetch {what} '{name}' ({reason}); {hint}") from None


def _from_pretrained(cls, name, what, flag, subfolder, **kwargs):
    """cls.from_pretrained(name) for a hub id, a model folder, or a diffusers pipeline folder (which keeps
    the part in `subfolder`), turning the library's long offline traceback into one line. A hub id already
    in the local cache loads without touching the network. A name that cannot be a hub id ('./x', '/x', 'a/b/c')
    or whose first part is a local folder ('data/myclip' beside data/) is a path, and a missing path is an error,
    never a hub download."""
    path = Path(name)
    if path.is_dir() and (path / subfolder).is_dir() and not (path / "config.json").exists():
        kwargs["subfolder"] = subfolder
    elif not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or
                                 (name.count("/") == 1 and path.parent.is_dir())):
        raise UserError(f"{what} folder '{name}' does not exist; pass an existing folder or a hub id with {flag}")
    if not path.exists():
        try:
            obj = cls.from_pretrained(name, local_files_only=True, **kwargs)
            if _complete(obj):
                return obj
        except (OSError, ValueError):
            pass
        require_hub(what, name, f"nor is it a local folder; download it where there is network (`hf download {name} "
                                f"--local-dir DIR`) and pass {flag} DIR")
    try:
        obj = cls.from_pretrained(name, **kwargs)
    except pickle.UnpicklingError:                   # torch.load(weights_only=True) refused a .bin: not a download issue
        raise UserError(f"{what} '{name}' holds pickled weights (.bin) that would run code when loaded, so they are "
                        "refused; use a copy with .safetensors weights, or convert it where you trust it") from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load {what} '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
            f"Offline? Download it where there is network (`hf download {name} --local-dir DIR`) "
            f"and pass {flag} DIR") from None
    if not _complete(obj):
        raise UserError(f"{what} '{name}' has no tokenizer files (vocab.json, merges.txt); pass {flag} a folder "
                        "or hub id that has them")
    return obj


def _complete(obj):
    """False for the 2-token tokenizer transformers 5 builds, instead of raising, when no tokenizer file exists."""
    return not (hasattr(obj, "get_vocab") and len(obj) < 256)


class FrozenVAE:
    """diffusers' AutoencoderKL, frozen. encode = posterior mean x scaling factor (the seed uses the mean,
    not a sample); decode divides it back. The scaling factor is read from the VAE's own config."""

    def __init__(self, name_or_path=DEFAULT_VAE, device="cpu", dtype=None, model=None):
        self.name = str(name_or_path)
        self.dtype = dtype or pick_dtype(torch.device(device), gpu="bf16")
        if model is None:                # else a VAE already built (a single file's own, see single_file_parts)
            from diffusers import AutoencoderKL
            model = _from_pretrained(AutoencoderKL, self.name, "VAE", "--vae", "vae", torch_dtype=self.dtype)
        # .type, not .to(dtype): diffusers' ModelMixin.to warns on every dtype cast, whatever the model
        self.vae = model.to(device=device).type(self.dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.memory_format = inference_memory_format(self.device)
        self.vae.to(memory_format=self.memory_format)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        # One 2x downsample per level but the last: 8 for SD's 4-level VAE, 4 for the demo's 3-level one.
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images):
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/f, W/f) scaled latents (f = self.factor), float32."""
        posterior = self.vae.encode(images.to(self.device, self.dtype, memory_format=self.memory_format)).latent_dist
        return posterior.mean.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents):
        """(N, 4, h, w) scaled latents -> (N, 3, f*h, f*w) images in [-1, 1], float32."""
        latents = latents.to(self.device, self.dtype, memory_format=self.memory_format) / self.scaling_factor
        return self.vae.decode(latents).sample.float()

    def decode_images(self, latents):
        """(N, 4, h, w) scaled latents -> (N, f*h, f*w, 3) uint8 RGB."""
        images = (self.decode(latents) / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def load_tokenizer(name_or_path, flag="--text_encoder"):
    """The CLIP tokenizer of a text encoder; `flag` is the option that named it, for the error messages."""
    from transformers import CLIPTokenizer
    return _from_pretrained(CLIPTokenizer, str(name_or_path), "tokenizer", flag, "tokenizer")


def tokenize(tokenizer, texts):
    """Prompts -> (N, 77) token ids, padded and truncated as SD (model_max_length, the tokenizer's pad)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids


class FrozenTextEncoder:
    """transformers' CLIPTextModel + CLIPTokenizer, frozen. layer='last' is SD1's last_hidden_state;
    layer='penultimate' is SD2's OpenCLIP-H context (the second-to-last block, then the final LayerNorm).
    HF conversions of SD2's encoder already dropped the last block and use 'last'."""

    def __init__(self, name_or_path=DEFAULT_TEXT_ENCODER["sd1"], device="cpu", dtype=None, layer="last", model=None,
                 tokenizer=None):
        self.name = str(name_or_path)
        self.layer = layer
        self.tokenizer = tokenizer or load_tokenizer(self.name)
        if model is None:                # else one already built (a single file's own, see single_file_parts)
            from transformers import CLIPTextModel
            model = _from_pretrained(CLIPTextModel, self.name, "text encoder", "--text_encoder", "text_encoder")
        self.model = model
        self.dtype = dtype or torch.float32
        self.model.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        if layer not in ("last", "penultimate"):
            raise UserError(f"text encoder layer must be 'last' or 'penultimate', not '{layer}'")

    @property
    def context_dim(self):
        return self.model.config.hidden_size

    @property
    def max_length(self):
        """Tokens per prompt: 77 for CLIP, read from the tokenizer that owns it."""
        return self.tokenizer.model_max_length

    def tokenize(self, texts):
        return tokenize(self.tokenizer, texts)

    @torch.no_grad()
    def encode_ids(self, ids):
        """(N, 77) token ids -> (N, 77, D) context."""
        out = self.model(ids.to(self.device), output_hidden_states=self.layer == "penultimate")
        if self.layer == "last":
            return out.last_hidden_state
        text_model = getattr(self.model, "text_model", self.model)  # transformers < 5 nests it
        return text_model.final_layer_norm(out.hidden_states[-2])

    def encode(self, texts):
        return self.encode_ids(self.tokenize(texts))


# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets), by device-name substring, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 5090": 209.5,
                    "RTX 4090": 165.2, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device):
    """The GPU's dense bf16 peak, or 0.0 when unknown (then no MFU is reported rather than a guess)."""
    if torch.device(device).type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def inference_memory_format(device):
    """channels_last (NHWC) on CUDA, where cuDNN's fastest fp16/bf16 convolutions take it; elsewhere each tensor
    keeps its layout, as diffusers runs it (the CPU parity tests compare the two)."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.preserve_format


def configure_cuda_backends():
    """Performance switches for entry scripts, set once at their top: TF32 matmuls/convs (bf16 training
    loses nothing to them), and SDPA limited to the flash and memory-efficient kernels, so a shape they
    cannot take fails loudly instead of silently falling back to the O(L^2)-memory math kernel."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        torch.backends.cuda.enable_math_sdp(False)


#################################################################################
#                             Checkpoint Formats                                #
#################################################################################
# Three ways UNet weights travel:
#   ours      - a training checkpoint (.pt: {"unet", "ema", "meta", ...}) or a slim export (.safetensors whose
#               metadata holds "meta" as JSON). "meta" always carries model_config, and the run's VAE and text
#               encoder ids, scaling factor and schedule when a training run wrote it.
#   diffusers - a UNet folder (config.json + diffusion_pytorch_model.safetensors|.bin) or a pipeline folder.
#   original  - CompVis/Stability single files (.ckpt/.safetensors) with model.diffusion_model.* keys, and
#               NeMo's (a .nemo archive holding model_weights.ckpt, or its .ckpt; keys model.model.diffusion_model.*:
#               NeMo wraps LatentDiffusion once more), the `from_NeMo` stage hand-off of NeMo's recipe.

_DIFFUSERS_UNSUPPORTED = {  # UNet2DConditionModel options outside the SD 1.x/2.x family, with their SD value
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "act_fn": "silu",
    "dual_cross_attention": False, "only_cross_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "time_cond_proj_dim": None, "encoder_hid_dim": None, "norm_eps": 1e-5, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "center_input_sample": False, "time_embedding_dim": None,
    "timestep_post_act": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}


def config_from_diffusers(d):
    """Map a diffusers UNet2DConditionModel config of the SD family onto a UNetConfig; anything outside the
    family (SDXL add-embeddings, class labels, ...) is refused by name rather than silently dropped."""
    for key, sd_value in _DIFFUSERS_UNSUPPORTED.items():
        value = d.get(key, sd_value)
        if isinstance(value, list) and key == "only_cross_attention":
            value = any(value)
        if value != sd_value:
            raise UserError(f"diffusers UNet option {key}={value!r} is outside the SD 1.x/2.x family this UNet implements")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise UserError(f"unsupported down_block_types {down}")
    attn = tuple(t == "CrossAttnDownBlock2D" for t in down)
    if up != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]:
        raise UserError(f"up_block_types {up} do not mirror down_block_types {down}")
    if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise UserError(f"unsupported mid_block_type {d.get('mid_block_type')}")
    n = len(down)
    per_stage = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
    chans = list(d["block_out_channels"])
    if any(c % chans[0] for c in chans) or not isinstance(d.get("layers_per_block", 2), int):
        raise UserError(f"unsupported block_out_channels {chans} / layers_per_block {d.get('layers_per_block')}")
    if isinstance(d.get("cross_attention_dim", 1280), (list, tuple)):
        raise UserError("per-stage cross_attention_dim is outside the SD family")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
        model_channels=chans[0], channel_mult=tuple(c // chans[0] for c in chans),
        num_res_blocks=d.get("layers_per_block", 2), attn_stages=attn,
        # diffusers' historical naming: attention_head_dim holds the number of heads when num_attention_heads is unset
        num_heads=per_stage(d.get("num_attention_heads") or d.get("attention_head_dim", 8)),
        transformer_depth=per_stage(d.get("transformer_layers_per_block", 1)),
        context_dim=d.get("cross_attention_dim", 1280), linear_proj=d.get("use_linear_projection", False),
        norm_groups=d.get("norm_num_groups", 32), flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0), dropout=d.get("dropout", 0.0))


def diffusers_config(cfg, sample_size=64):
    """Our UNetConfig as a diffusers UNet2DConditionModel config.json."""
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "sample_size": sample_size,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attn_stages],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attn_stages)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": list(cfg.num_heads), "transformer_layers_per_block": list(cfg.transformer_depth),
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.linear_proj,
        "norm_num_groups": cfg.norm_groups, "norm_eps": 1e-5, "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift, "act_fn": "silu", "downsample_padding": 1, "dropout": cfg.dropout,
    }


_RESNET_TO_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                       "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def original_key_map(cfg):
    """{our key: original CompVis key} for every UNet parameter. The original UNet numbers its blocks flat:
    input_blocks = [conv_in, (res, attn) x L per stage, downsample per stage], output_blocks = (res, attn,
    upsample) x (L+1) per stage, middle_block = [res, attn, res]."""
    with torch.device("meta"):
        keys = list(UNet(cfg).state_dict())
    L = cfg.num_res_blocks
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2"}
    n = len(cfg.channel_mult)
    for i in range(n):
        for j in range(L):
            top[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (L + 1) + j + 1}.0"
            top[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (L + 1) + j + 1}.1"
        top[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (L + 1)}.0.op"
        for j in range(L + 1):
            top[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (L + 1) + j}.0"
            top[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (L + 1) + j}.1"
        has_attn = cfg.attn_stages[n - 1 - i]
        top[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv"
    out = {}
    for k in keys:
        prefix = max((p for p in top if k.startswith(p + ".")), key=len)
        rest = k[len(prefix) + 1:]
        if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
            name, _, param = rest.partition(".")
            rest = f"{_RESNET_TO_ORIGINAL[name]}.{param}"
        out[k] = f"{top[prefix]}.{rest}"
    return out


ORIGINAL_PREFIX = "model.diffusion_model."
NEMO_PREFIX = "model." + ORIGINAL_PREFIX


def infer_config_from_original(sd):
    """Rebuild a UNetConfig from original-layout weights (no prefix). Widths, depths, attention stages and
    context size are read off tensor shapes; head counts are not stored in weights, so they follow SD's
    convention: 8 heads for conv-projection (SD1) models, heads of width 64 for linear-projection (SD2) ones."""
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})
    downs = [b for b in blocks if f"input_blocks.{b}.0.op.weight" in sd]
    n = len(downs) + 1
    L = (len(blocks) - 1 - len(downs)) // n
    ch0, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
    stage_first = [i * (L + 1) + 1 for i in range(n)]
    chans = [sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in stage_first]
    attn = tuple(f"input_blocks.{b}.1.proj_in.weight" in sd for b in stage_first)
    a_key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    linear = sd[next(k for k in sd if k.endswith(".1.proj_in.weight"))].dim() == 2
    depth = tuple(len({k.split("transformer_blocks.")[1].split(".")[0] for k in sd
                       if k.startswith(f"input_blocks.{b}.1.transformer_blocks.")}) or 1 for b in stage_first)
    return UNetConfig(in_channels=in_ch, out_channels=sd["out.2.weight"].shape[0], model_channels=ch0,
                      channel_mult=tuple(c // ch0 for c in chans), num_res_blocks=L, attn_stages=attn,
                      num_heads=tuple(max(c // 64, 1) if linear else 8 for c in chans), transformer_depth=depth,
                      context_dim=sd[a_key].shape[1], linear_proj=linear)


_WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_state_dict(sd):
    """Strip what DDP (module.), a parent module (unet.), torch.compile (_orig_mod.) and FSDP wrappers add."""
    out = {}
    for k, v in sd.items():
        for part in _WRAPPER_PARTS:
            k = k.replace(part, "")
        while k.startswith(("module.", "unet.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _read_tensors(path):
    """{name: tensor} and safetensors metadata from a weights file; pickles only with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise UserError(f"'{path}' is not a readable safetensors file ({e}); a download or copy cut short? "
                            "Fetch it again") from None
    source, mmap = path, True
    if path.suffix == ".nemo":                     # a tar: model_config.yaml + model_weights.ckpt
        import io
        import tarfile
        try:
            with tarfile.open(path, "r:*") as tf:
                member = next((m for m in tf if m.isfile() and Path(m.name).name == "model_weights.ckpt"), None)
                if member is None:
                    raise UserError(f"'{path}' holds no model_weights.ckpt (a distributed NeMo checkpoint: "
                                    "convert it to a single file with NeMo first)")
                source, mmap = io.BytesIO(tf.extractfile(member).read()), False
        except (tarfile.TarError, EOFError) as e:
            raise UserError(f"'{path}' is not a readable .nemo archive ({str(e).splitlines()[0]})") from None
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise UserError(f"'{path}' is not a readable weights file ({type(e).__name__}: {str(e)[:120]}); a "
                        "Lightning .ckpt with config objects: save its ['state_dict'] alone where you trust it"
                        ) from None
    return obj, {}


# Our two formats. A slim export (.safetensors) holds UNet weights and `meta` in its metadata; a training
# checkpoint (SD_Train.py, torch.save of plain tensors and types, so weights_only=True loads it) holds
# TRAINING_CHECKPOINT_KEYS. Both carry the same `meta`, built by checkpoint_meta alone.
TRAINING_CHECKPOINT_KEYS = ("unet", "ema", "optimizer", "lr_scheduler", "scaler", "progress", "rng", "meta")


def checkpoint_meta(model_cfg, schedule, vae, scaling_factor, text_encoder, text_layer, resolution, run_config=None):
    """What every checkpoint and export of ours records besides weights, so sampling needs no model flags: the
    UNet config, the noise schedule, the frozen parts it was trained with (ids, the latents' scaling factor),
    the training resolution (the samplers' default size) and the run's resolved config."""
    return {"model_config": asdict(unet_config(model_cfg)), "schedule": schedule.to_dict(), "vae": str(vae),
            "scaling_factor": scaling_factor, "text_encoder": str(text_encoder), "text_layer": text_layer,
            "resolution": resolution, "run_config": dict(run_config or {})}


def is_training_checkpoint(obj, resumable=False):
    """Has the weights and meta of a training checkpoint (and, `resumable`, everything a resume restores)."""
    need = TRAINING_CHECKPOINT_KEYS if resumable else ("unet", "ema", "meta")
    return isinstance(obj, dict) and set(need) <= set(obj)


def read_training_checkpoint(path, flag="--resume"):
    """A training checkpoint of SD_Train.py (memory-mapped, weights_only), or one line saying what `path` is
    instead: a missing file, a damaged one, an export that holds weights only, another project's file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        raise UserError(f"{flag}: '{path}' is a weights-only export (no optimizer, schedule or progress) and cannot "
                        f"continue a run; start a new phase from it with --init '{path}'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a text file and a refused pickle all mean "not usable"
        raise UserError(f"{flag}: '{path}' is not a readable training checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not is_training_checkpoint(obj, resumable=True):
        raise UserError(f"{flag}: '{path}' is not a training checkpoint of SD_Train.py (it lacks "
                        f"{sorted(set(TRAINING_CHECKPOINT_KEYS) - set(obj if isinstance(obj, dict) else {}))}); "
                        "to start from its weights use --init")
    return obj


def read_unet_state(path, prefer_ema=True):
    """(state_dict in our key names, UNetConfig, meta) from any supported format (see the banner above)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    if path.is_dir():
        if (path / "unet").is_dir():               # a diffusers pipeline folder
            path = path / "unet"
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise UserError(f"'{path}' is not a diffusers UNet or pipeline folder (no config.json or unet/)")
        files = [path / f"diffusion_pytorch_model{v}.{ext}" for ext in ("safetensors", "bin") for v in ("", ".fp16")]
        index = path / "diffusion_pytorch_model.safetensors.index.json"
        if index.exists():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = [next((f for f in files if f.exists()), None)]
            if files[0] is None:
                raise UserError(f"no diffusion_pytorch_model.safetensors/.bin in '{path}'")
        sd = {}
        for f in files:
            sd.update(_read_tensors(f)[0])
        cfg = config_from_diffusers(json.loads(cfg_file.read_text()))
        return sd, cfg, {"model_config": asdict(cfg), "source": "diffusers"}

    obj, metadata = _read_tensors(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if isinstance(sd, dict) and any(k.startswith(NEMO_PREFIX) for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    is_original = isinstance(sd, dict) and any(k.startswith(ORIGINAL_PREFIX) for k in sd)
    if "meta" in metadata and not is_original:     # our slim export
        meta = json.loads(metadata["meta"])
        return obj, unet_config(meta["model_config"]), meta
    if is_training_checkpoint(obj):
        meta = obj["meta"]
        sd = obj["ema"] if prefer_ema and obj.get("ema") is not None else obj["unet"]
        return clean_state_dict(sd), unet_config(meta["model_config"]), meta
    if is_original:                                # original single file (or NeMo's)
        flat_ema = {k: v for k, v in sd.items() if k.startswith("model_ema.")}
        orig = {k[len(ORIGINAL_PREFIX):]: v for k, v in sd.items() if k.startswith(ORIGINAL_PREFIX)}
        if prefer_ema and len(flat_ema) > 100:     # EMA copy stored with dots removed: model_ema.diffusion_modelX
            orig = {k: flat_ema.get("model_ema.diffusion_model" + k.replace(".", ""), v) for k, v in orig.items()}
        # Our own original-layout exports keep their exact config (head counts included) and the rest of their
        # meta (schedule, scaling factor, the parts' configs) in the metadata.
        meta = json.loads(metadata["meta"]) if "meta" in metadata else {}
        cfg = unet_config(meta["model_config"]) if meta else infer_config_from_original(orig)
        inverse = {v: k for k, v in original_key_map(cfg).items()}
        unexpected = sorted(set(orig) - set(inverse))
        if unexpected:
            raise UserError(f"'{path}': original-layout keys this UNet config does not have: {unexpected[:8]}")
        return {inverse[k]: v for k, v in orig.items()}, cfg, dict(meta, model_config=asdict(cfg), source="original")
    raise UserError(f"'{path}' is not a UNet checkpoint this project knows (ours, a diffusers folder, or an "
                    "original single file with model.diffusion_model.* keys)")


def build_unet(cfg, state_dict=None, source="checkpoint"):
    """A UNet on CPU in fp32: freshly initialized, or with a state dict built on the meta device and given copies
    of its tensors (no random init of 860M parameters that the load would overwrite), checked strictly first,
    with a readable list of what does not fit."""
    cfg = unet_config(cfg)
    if state_dict is None:
        return UNet(cfg).initialize_weights()
    with torch.device("meta"):
        unet = UNet(cfg)
    expected = unet.state_dict()
    missing, unexpected = _key_diff(expected, state_dict)
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise UserError(f"{source} does not fit UNet config: {len(missing)} missing keys {missing[:6]}, "
                        f"{len(unexpected)} unexpected keys {unexpected[:6]}, {len(wrong)} wrong shapes {wrong[:3]}")
    unet.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state_dict.items()}, assign=True)
    return unet


def _key_diff(expected, got):
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def load_unet(path, prefer_ema=True):
    """Our UNet from any supported checkpoint format, EMA weights preferred when the file has them."""
    sd, cfg, _ = read_unet_state(path, prefer_ema)
    return build_unet(cfg, sd, source=f"'{path}'")


def save_unet(state_dict, cfg, dst, fmt="ours", meta=None, sample_size=64):
    """Write UNet weights as `fmt`: ours (.safetensors + meta), diffusers (UNet folder) or single-file (the original
    layout: one .safetensors with model.diffusion_model.* keys, our config kept in its metadata for exact round
    trips)."""
    from safetensors.torch import save_file
    cfg = unet_config(cfg)
    meta = dict(meta or {}, model_config=asdict(cfg))
    sd = {k: v.contiguous() for k, v in clean_state_dict(state_dict).items()}
    missing, unexpected = _key_diff(original_key_map(cfg), sd)
    if missing or unexpected:
        raise UserError(f"weights do not fit the UNet config: missing {missing[:6]}, unexpected {unexpected[:6]}")
    if fmt == "ours":
        with atomic_path(dst) as tmp:
            save_file(sd, str(tmp), metadata={"meta": json.dumps(meta)})
    elif fmt == "diffusers":
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_text(json.dumps(diffusers_config(cfg, sample_size), indent=2))
        with atomic_path(dst / "diffusion_pytorch_model.safetensors") as tmp:
            save_file(sd, str(tmp))
    elif fmt == "single-file":
        key_map = original_key_map(cfg)
        orig = {ORIGINAL_PREFIX + key_map[k]: v for k, v in sd.items()}
        with atomic_path(dst) as tmp:
            save_file(orig, str(tmp), metadata={"meta": json.dumps(meta)})
    else:
        raise UserError(f"unknown format '{fmt}'; choose ours, diffusers or single-file")


#################################################################################
#                     Whole-Pipeline Export (diffusers, single file)            #
#################################################################################

def _vae_original_key_map(vae_cfg):
    """{diffusers AutoencoderKL key prefix: original first_stage_model key prefix} (the inverse of diffusers'
    convert_ldm_vae_checkpoint), for any number of levels and layers."""
    n, L = len(vae_cfg["block_out_channels"]), vae_cfg["layers_per_block"]
    m = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for side in ("encoder", "decoder"):
        m[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        for j in range(2):
            m[f"{side}.mid_block.resnets.{j}."] = f"{side}.mid.block_{j + 1}."
    for i in range(n):
        for j in range(L):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(L + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    return m


_VAE_ATTN_TO_ORIGINAL = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_original_keys(vae_sd, vae_cfg):
    """{diffusers AutoencoderKL key: original `first_stage_model.*` key} for every key of vae_sd."""
    prefixes = _vae_original_key_map(vae_cfg)
    out = {}
    for k in vae_sd:
        p = max((p for p in prefixes if k.startswith(p)), key=len, default="")
        new = prefixes.get(p, "") + k[len(p):]
        if ".mid.attn_1." in new:
            head, rest = new.split(".mid.attn_1.")
            rest = next((o + rest[len(d):] for d, o in _VAE_ATTN_TO_ORIGINAL.items() if rest.startswith(d)), rest)
            new = f"{head}.mid.attn_1.{rest}"
        out[k] = "first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")
    return out


def vae_to_original(vae_sd, vae_cfg):
    """diffusers AutoencoderKL weights -> original layout (the attention linears stored as 1x1 convs)."""
    keys = vae_original_keys(vae_sd, vae_cfg)
    return {keys[k]: v[:, :, None, None] if ".attn_1." in keys[k] and v.dim() == 2 else v for k, v in vae_sd.items()}


def text_encoder_original_key(k):
    """A CLIPTextModel key -> its original `cond_stage_model.transformer.text_model.*` key (transformers >= 5
    dropped the text_model. level that the original layout keeps)."""
    return "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)


def tokenizer_files(tokenizer):
    """{file name: text} of everything a tokenizer folder needs (tokenizer.json, vocab.json, merges.txt, its
    config): a single file carries them in its metadata, so it needs no tokenizer from elsewhere."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        save_bpe_files(tokenizer, tmp)
        return {f.name: f.read_text(encoding="utf-8") for f in Path(tmp).iterdir() if f.is_file()}


def single_file_parts(path, meta, device, dtype):
    """(FrozenVAE, FrozenTextEncoder) from the weights inside one of our single files, built from the configs
    and tokenizer its metadata carries (export_pipeline writes them): no --vae / --text_encoder needed."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel
    vae = AutoencoderKL.from_config(meta["vae_config"])
    te = CLIPTextModel(CLIPTextConfig.from_dict(meta["text_encoder_config"]))
    with safe_open(str(path), framework="pt") as f:
        for model, keys in ((vae, vae_original_keys(vae.state_dict(), vae.config)),
                            (te, {k: text_encoder_original_key(k) for k in te.state_dict()})):
            own, stored = model.state_dict(), set(f.keys())
            missing = [o for o in keys.values() if o not in stored]
            if missing:
                raise UserError(f"'{path}' lacks {len(missing)} weights of its own VAE / text encoder {missing[:3]}; "
                                "pass --vae and --text_encoder")
            model.load_state_dict({k: f.get_tensor(o).reshape(own[k].shape) for k, o in keys.items()})
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in meta["tokenizer_files"].items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        tokenizer = load_tokenizer(tmp)
    name = f"{path} (its own)"
    return (FrozenVAE(name, device, dtype, model=vae),
            FrozenTextEncoder(name, device, dtype, layer=meta.get("text_layer", "last"), model=te, tokenizer=tokenizer))


def save_bpe_files(tokenizer, folder):
    """vocab.json + merges.txt beside tokenizer.json: what older transformers and the slow CLIPTokenizer read
    (transformers 5 writes tokenizer.json alone). Both come from the fast tokenizer's own BPE model."""
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (Path(folder) / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def single_file_state(unet_sd, unet_cfg, vae_model, text_model, dtype):
    """The original layout's one state dict: model.diffusion_model.* (UNet), first_stage_model.* (VAE),
    cond_stage_model.transformer.text_model.* (CLIP text), every tensor in `dtype`."""
    key_map = original_key_map(unet_cfg)
    sd = {ORIGINAL_PREFIX + key_map[k]: v.to(dtype) for k, v in clean_state_dict(unet_sd).items()}
    sd.update({k: v.to(dtype) for k, v in vae_to_original(vae_model.state_dict(), vae_model.config).items()})
    sd.update({text_encoder_original_key(k): v.to(dtype) for k, v in text_model.state_dict().items()})
    return sd


def export_pipeline(dst, fmt, unet_sd, unet_cfg, vae, text_encoder, schedule, sample_size=64, dtype=torch.float16,
                    sampler="ddim"):
    """Write a whole text-to-image model: `diffusers` = a StableDiffusionPipeline folder (model_index.json,
    unet/, vae/, text_encoder/, tokenizer/, scheduler/); `single-file` = the original layout in one
    .safetensors (model.diffusion_model / first_stage_model / cond_stage_model.transformer) that diffusers'
    from_single_file and the common UIs read. The folder's scheduler is `sampler`'s (diffusers_scheduler_config)."""
    unet_sd = {k: v.to(dtype) for k, v in clean_state_dict(unet_sd).items()}
    if fmt == "diffusers":
        scheduler_class, scheduler = diffusers_scheduler_config(schedule, sampler=sampler)
        dst = Path(dst)
        if dst.exists() and any(dst.iterdir()) and not (dst / "model_index.json").exists():
            raise UserError(f"'{dst}' exists and is not a pipeline folder this export would replace; pick a new one")
        with atomic_folder(dst) as tmp:              # built beside, then swapped in: never half a pipeline
            save_unet(unet_sd, unet_cfg, tmp / "unet", "diffusers", sample_size=sample_size)
            copy.deepcopy(vae.vae).type(dtype).save_pretrained(tmp / "vae")   # copies: the live parts keep their dtype
            copy.deepcopy(text_encoder.model).to(dtype).save_pretrained(tmp / "text_encoder")
            # transformers 5 loads a model in the dtype its config names, diffusers loads UNet and VAE in fp32
            # unless told: the config says fp32 (the weights stay `dtype`), so a plain from_pretrained(DIR) gives
            # every part one dtype
            te_config = tmp / "text_encoder" / "config.json"
            te_config.write_text(json.dumps(dict(json.loads(te_config.read_text()), dtype="float32"), indent=2))
            text_encoder.tokenizer.save_pretrained(tmp / "tokenizer")
            save_bpe_files(text_encoder.tokenizer, tmp / "tokenizer")
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
            (tmp / "model_index.json").write_text(json.dumps({
                "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", scheduler_class], "safety_checker": [None, None],
                "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))
    elif fmt == "single-file":
        from safetensors.torch import save_file
        if text_encoder.layer != "last":
            raise UserError("single-file export of a penultimate-layer (OpenCLIP) text encoder is not supported; "
                            "use --export diffusers")
        if schedule.flow:   # the original layout names no objective: every reader would sample it as eps
            raise UserError("a flow model has no single-file form: UIs and from_single_file would sample it as an "
                            "eps model; use --export diffusers, or sample the checkpoint with SD_ImageGen.py")
        sd = single_file_state(unet_sd, unet_cfg, vae.vae, text_encoder.model, dtype)
        # Beside the weights, what rebuilds the VAE and text encoder around them (single_file_parts): their
        # configs and the tokenizer, so the file alone samples (a few MB of metadata on GBs of weights).
        meta = dict(checkpoint_meta(unet_cfg, schedule, vae.name, vae.scaling_factor, text_encoder.name, "last",
                                    sample_size * vae.factor),
                    vae_config=dict(vae.vae.config), tokenizer_files=tokenizer_files(text_encoder.tokenizer),
                    text_encoder_config=json.loads(text_encoder.model.config.to_json_string()))
        with atomic_path(dst) as tmp:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
    else:
        raise UserError(f"unknown export format '{fmt}'; choose diffusers or single-file")


def default_spacing(schedule):
    """SD's leading spacing, except trailing for a zero-terminal-SNR schedule: only trailing starts sampling at
    t = T, the pure-noise step such a model was trained on (Lin et al. 2023, sec. 3.3)."""
    return "trailing" if schedule.zero_terminal_snr else "leading"


def diffusers_scheduler_config(schedule, spacing=None, steps_offset=1, sampler="ddim"):
    """(class name, config) of the diffusers scheduler that samples as SAMPLERS[sampler] does, step for step (the
    sampler tests load it with from_config): what an export writes, so the pipeline draws with the user's choice."""
    if schedule.flow:
        flow = diffusers_flow_scheduler_config(schedule)
        return flow["_class_name"], flow
    spacing = spacing or default_spacing(schedule)
    dpm = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
               final_sigmas_type="zero", use_karras_sigmas=False)
    own = {"ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),  # alpha_prev(0) = abar_0
           "ddpm": ("DDPMScheduler", dict(clip_sample=False, variance_type="fixed_small")),
           "euler": ("EulerDiscreteScheduler", dict(interpolation_type="linear", use_karras_sigmas=False)),
           "euler_a": ("EulerAncestralDiscreteScheduler", {}),
           "dpmpp_2m": ("DPMSolverMultistepScheduler", dpm),
           "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(dpm, use_karras_sigmas=True))}
    check_sampler(sampler)
    check_sampler_fits(sampler, schedule)
    if sampler == "dpmpp_2m_karras" and (schedule.zero_terminal_snr or schedule.beta_schedule == "squaredcos_cap_v2"):
        # Karras sigmas from this schedule's huge sigma_max map several steps to t = T - 1 (or truncate cosine's to
        # one t): diffusers then starts at the second of them and indexes past its sigmas (diffusers issue #12771)
        raise UserError("diffusers' DPMSolverMultistepScheduler with Karras sigmas fails on a zero-terminal-SNR or "
                        "cosine schedule (repeated first timestep, diffusers issue #12771); export with --sampler "
                        "dpmpp_2m")
    name, extra = own[sampler]
    return name, {"_class_name": name, "_diffusers_version": "0.30.0",
                  "num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
                  "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
                  "prediction_type": schedule.prediction_type, "rescale_betas_zero_snr": schedule.zero_terminal_snr,
                  "steps_offset": steps_offset, "timestep_spacing": spacing, **extra}


def diffusers_flow_scheduler_config(schedule):
    """A flow model's scheduler for diffusers' StableDiffusionPipeline. Not FlowMatchEulerDiscreteScheduler (what
    sample_flow_euler equals): the pipeline scales its first latents by scheduler.init_noise_sigma, which that
    scheduler lacks (AttributeError before the first step). DPMSolverMultistepScheduler's flow mode (diffusers >=
    0.32; older ones ignore these keys and sample it as eps) runs there, and at solver_order 1 it is DPM-Solver++(1),
    which in the flow's parametrization is the Euler step itself; its sigmas run from time_shift(1 - 1/T) down to 0
    (ours from 1) and its UNet sees int(s T), so its images are close to flow_euler's, not bit-equal."""
    return {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.32.0",
            "num_train_timesteps": schedule.num_train_timesteps, "prediction_type": "flow_prediction",
            "use_flow_sigmas": True, "flow_shift": schedule.flow_shift, "solver_order": 1,
            "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero",
            "steps_offset": 1}            # unused by flow sigmas; StableDiffusionPipeline warns on any other value


#################################################################################
#                            Text-to-Image Sampling                             #
#################################################################################

@dataclass
class Pipeline:
    """Everything sampling needs; built by load_pipeline from a checkpoint, or by SD_Train from live parts."""
    unet: nn.Module
    text_encoder: FrozenTextEncoder
    vae: FrozenVAE
    schedule: NoiseSchedule
    spacing: str = None          # None: default_spacing(schedule)
    steps_offset: int = 1
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.spacing = self.spacing or default_spacing(self.schedule)


def load_pipeline(ckpt, device="cpu", dtype=torch.float32, weights="ema", vae=None, text_encoder=None,
                  text_layer=None):
    """A Pipeline from anything load_unet reads. A diffusers pipeline folder brings its own VAE, text encoder,
    tokenizer and scheduler settings; our checkpoints name the VAE / text encoder they were trained with
    (the arguments override either)."""
    ckpt = Path(ckpt)
    sd, cfg, meta = read_unet_state(ckpt, prefer_ema=weights == "ema")
    if weights == "live" and ckpt.suffix == ".safetensors" and "run_config" in meta:
        raise UserError(f"'{ckpt}' is a slim export of EMA weights only; the live weights are in the run's "
                        "training checkpoints (checkpoints/step_*.pt): pass one of those with --weights live")
    spacing, offset = None, 1
    sched_kw = meta.get("schedule", {})
    pipeline_folder = ckpt.is_dir() and (ckpt / "model_index.json").exists()
    if pipeline_folder:
        vae, text_encoder = vae or str(ckpt), text_encoder or str(ckpt)
        sc = json.loads((ckpt / "scheduler" / "scheduler_config.json").read_text())
        sched_kw = {k: sc[d] for k, d in [("num_train_timesteps", "num_train_timesteps"), ("beta_start", "beta_start"),
                    ("beta_end", "beta_end"), ("beta_schedule", "beta_schedule"), ("prediction_type", "prediction_type"),
                    ("zero_terminal_snr", "rescale_betas_zero_snr")] if d in sc}
        if sc.get("prediction_type") == "flow_prediction" or sc.get("_class_name", "").startswith("FlowMatch"):
            # a flow model: our export's DPMSolverMultistepScheduler flow mode, or a FlowMatch* scheduler
            sched_kw.update(prediction_type="flow", flow_shift=sc.get("flow_shift", sc.get("shift", 1.0)))
        spacing, offset = sc.get("timestep_spacing", "leading"), sc.get("steps_offset", 1)
    own_parts = "tokenizer_files" in meta and not (vae or text_encoder)    # one of our single files
    vae = vae or meta.get("vae")
    text_encoder = text_encoder or meta.get("text_encoder")
    if not (vae and text_encoder or own_parts):
        raise UserError(f"'{ckpt}' does not say which VAE / text encoder it was trained with; pass --vae and --text_encoder")
    unet = build_unet(cfg, sd, source=f"'{ckpt}'").to(device=device, dtype=dtype).eval()
    unet.to(memory_format=inference_memory_format(device))
    if own_parts:
        frozen_vae, te = single_file_parts(ckpt, meta, device, dtype)
    else:
        te = FrozenTextEncoder(text_encoder, device, dtype, layer=text_layer or meta.get("text_layer", "last"))
        frozen_vae = FrozenVAE(vae, device, dtype)
    if pipeline_folder:   # diffusers records the latent size: the image size is that x the VAE's own factor
        sample_size = json.loads((ckpt / "unet" / "config.json").read_text())["sample_size"]
        meta = dict(meta, resolution=sample_size * frozen_vae.factor)
    return Pipeline(unet, te, frozen_vae, NoiseSchedule.from_dict(sched_kw), spacing, offset, meta)


def initial_latents(n, channels, height, width, seed, device, factor):
    """diffusers' convention, so a seed draws the same image as StableDiffusionPipeline: one CPU randn of
    the whole batch, then moved to the device. `factor` is the VAE's downsampling (FrozenVAE.factor)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((n, channels, height // factor, width // factor), generator=g).to(device), g


def check_sampler(sampler, eta=None):
    """A sampler name and its eta, one line each: eta scales the noise a sampler adds, so it is >= 0, and a sampler
    that adds none (no eta in its signature) refuses one rather than ignore it."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    if eta is not None and "eta" not in inspect.signature(SAMPLERS[sampler]).parameters:
        noisy = [n for n, f in SAMPLERS.items() if "eta" in inspect.signature(f).parameters]
        raise UserError(f"{sampler} adds no noise: --eta does not apply to it (it does to {', '.join(noisy)})")
    if eta is not None and eta < 0:
        raise UserError(f"--eta must be at least 0, got {eta}")


def check_sampling_args(height, width, sampler, steps, factor=None, images_per_prompt=1, eta=None):
    """Every sampling argument checked before any model is loaded: one line each. A size left None (the
    checkpoint's resolution) is not checked; `factor` (the VAE's downsampling) is known once the VAE is loaded."""
    for name, side in (("height", height), ("width", width)):
        if side is not None and side <= 0:
            raise UserError(f"{name} must be positive, got {side}")
        if side is not None and factor and side % factor:
            raise UserError(f"{name} must be a multiple of {factor} (the VAE's downsampling), got {side}")
    if sampler is not None:                              # None: the checkpoint's own (default_sampler)
        check_sampler(sampler, eta)
    if steps < 1:
        raise UserError(f"sampling steps must be at least 1, got {steps}")
    if images_per_prompt < 1:
        raise UserError(f"images per prompt must be at least 1, got {images_per_prompt}")


@torch.no_grad()
def generate(pipe, prompts, negative="", steps=50, guidance_scale=7.5, sampler=None, eta=None, seed=0, height=512,
             width=512, images_per_prompt=1, clip_x0=None, progress=False):
    """Prompts -> uint8 images (N, H, W, 3). The negative prompt (or "") is the unconditional CFG branch; sampler
    None is the checkpoint's default_sampler; `progress` shows a bar over the sampling steps (minutes on a CPU)."""
    check_sampling_args(height, width, sampler, steps, pipe.vae.factor, images_per_prompt, eta)
    sampler = sampler or default_sampler(pipe.schedule)
    check_sampler_fits(sampler, pipe.schedule)
    prompts = [p for p in prompts for _ in range(images_per_prompt)]
    te, device = pipe.text_encoder, pipe.vae.device
    for p in set(prompts) | {negative}:
        if len(te.tokenizer(p).input_ids) > te.max_length:
            print(f"warning: prompt truncated to {te.max_length} tokens: {p[:60]!r}...")
    dtype = next(pipe.unet.parameters()).dtype
    cond = te.encode(prompts).to(device, dtype)
    uncond = te.encode([negative] * len(prompts)).to(device, dtype)
    x, g = initial_latents(len(prompts), pipe.unet.config.in_channels, height, width, seed, device, pipe.vae.factor)
    kw = dict(spacing=pipe.spacing, steps_offset=pipe.steps_offset, generator=g, clip_x0=clip_x0)
    if eta is not None:   # else each sampler's own default: 0 for ddim and euler, 1 for ddpm and euler_a
        kw["eta"] = eta
    model_fn = cfg_model_fn(pipe.unet, cond, uncond, guidance_scale)
    from tqdm import tqdm
    with tqdm(total=steps, disable=not progress, desc=f"{sampler} x{len(prompts)}", unit="step", leave=False) as bar:
        latents = SAMPLERS[sampler](model_fn, x, pipe.schedule, steps, callback=lambda *_: bar.update(1), **kw)
    return pipe.vae.decode_images(latents)


def make_grid(images, cols):
    """(N, H, W, 3) -> one contact sheet, row-major, padded with black."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid



#################################################################################
#                                     CLI                                       #
#################################################################################

def count_params(module):
    return sum(p.numel() for p in module.parameters())


def info(args):
    cfg = unet_config(args.config)
    with torch.device("meta"):
        unet = UNet(cfg)
    print(f"UNet config '{args.config}': {count_params(unet):,} parameters")
    print(json.dumps(asdict(cfg)))
    print(f"{'block':<14}{'channels':>10}{'attention':>11}{'heads x dim':>13}{'params':>15}")
    blocks = [(f"down {i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid", unet.mid_block)] + \
             [(f"up {i}", b) for i, b in enumerate(unet.up_blocks)]
    for name, block in blocks:
        ch = block.resnets[-1].conv2.out_channels
        has_attn = block.attentions is not None
        heads = block.attentions[0].transformer_blocks[0].attn1.heads if has_attn else 0
        hd = f"{heads} x {ch // heads}" if has_attn else "-"
        print(f"{name:<14}{ch:>10}{str(has_attn):>11}{hd:>13}{count_params(block):>15,}")


def convert(args):
    sd, cfg, meta = read_unet_state(args.src, prefer_ema=args.weights == "ema")
    save_unet(sd, cfg, args.dst, args.format, meta)
    print(f"wrote {args.dst} ({args.format}, {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters)")


def main(args):
    {"info": info, "convert": convert}[args.command](args)


if __name__ == "__main__":
    parser = arg_parser("SD UNet tools: parameter layout and checkpoint conversion.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print parameter count and per-stage layout of a named config",
                       formatter_class=HelpFormatter)
    p.add_argument("--config", default="sd1", choices=sorted(UNET_CONFIGS), help="named UNet config")
    p = sub.add_parser("convert", help="convert UNet weights between formats (lossless)",
                       formatter_class=HelpFormatter)
    p.add_argument("src", help="our checkpoint (.pt/.safetensors), a diffusers folder, or an original single file")
    p.add_argument("dst", help="output file (ours, single-file) or folder (diffusers)")
    p.add_argument("--format", required=True, choices=["ours", "diffusers", "single-file"],
                   help="output format (single-file: the original CompVis layout, the UNet alone)")
    p.add_argument("--weights", default="ema", choices=["ema", "live"], help="which weights of a training checkpoint")
    run_main(main, parser.parse_args())
