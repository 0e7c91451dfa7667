"""Train the demo's small AutoencoderKL on the images of webdataset tars and save it with save_pretrained.

No pretrained VAE is reachable offline, so the demo trains its own: a 3-level diffusers AutoencoderKL (4x
downsampling: 64 px images -> 4 x 16 x 16 latents) with an MSE reconstruction loss and a small KL term (the
LDM recipe without its perceptual and GAN losses, which flat shapes do not need; MSE rather than L1 because L1's
constant-size gradient left the shapes' colors wrong for hundreds more steps). 1000 steps of 16 images, no
attention in the middle blocks: on seeds 0-2 the demo's classifier reads 400 reconstructions' colors right (1.00,
1.00, 0.99; PSNR 28.1, 31.3, 26.2 dB), where 1500 steps of 8 merged blue and cyan for seed 1 (0.88). Its scaling
factor is set to 1 / std of the latents, as SD's 0.18215 was measured, so encode_latents.py, SD_Train.py and
SD_ImageGen.py load it with `--vae DIR` exactly as they load sd-vae-ft-mse.

    python -m demo.train_vae --tars data/demo/tars --out data/demo/vae
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import sd_data
from sd_common import UserError, arg_parser, atomic_folder, check_writable, require_positive, run_main


def load_images(tars, resolution, min_size):
    """Every decodable image of the tars, preprocessed as encode_latents does: (N, res, res, 3) uint8, in key
    order (img2dataset writes samples in download-completion order; sorting makes the run reproducible)."""
    images, skipped = {}, 0
    for tar in tqdm(tars, desc="read", unit="tar"):
        for key, sample in sd_data.iter_tar_samples(tar):
            try:
                images[key] = sd_data.load_image_square(sd_data.sample_image(sample), resolution, min_size)
            except sd_data.BadSample:
                skipped += 1
    if not images:
        raise UserError(f"no usable images in {len(tars)} tars")
    return torch.from_numpy(np.stack([images[k] for k in sorted(images)])), skipped


def build_vae(channels, layers, groups):
    """An AutoencoderKL with one level per entry of `channels`; each level but the last halves the size. No
    attention in the middle blocks: with it (750 steps), seed 1's VAE drew a ring at the top left of blue, cyan and
    purple shapes on gray (PSNR 25.7 dB, and the UNet learned the ring); without it none (29.8 dB). Without it, 750
    steps left seed 0's blue and cyan alike (color 0.86), hence 1000, in about the time of 750 with channels_last."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         layers_per_block=layers, norm_num_groups=groups, mid_block_add_attention=False)


def lr_at(step, steps, warmup):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def latent_stats(vae, images, batch):
    """(std of the posterior means, reconstruction PSNR in dB) over `images`: the means are what
    FrozenVAE.encode stores, so their std is what the scaling factor must undo."""
    means, sq_err = [], 0.0
    for i in range(0, len(images), batch):
        x = sd_data.images_to_tensor(images[i:i + batch])                # (B, 3, res, res) in [-1, 1]
        mean = vae.encode(x).latent_dist.mean                            # (B, 4, res/f, res/f)
        means.append(mean)
        sq_err += ((vae.decode(mean).sample.clamp(-1, 1) - x) / 2).pow(2).sum().item()
    mse = sq_err / (len(images) * images[0].numel())
    return torch.cat(means).std().item(), -10 * math.log10(max(mse, 1e-12))


def main(args):
    require_positive(args, "steps", "batch_size", "stat_images", "log_every", "resolution")
    if args.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be 0 or more, got {args.warmup_steps}")
    out = Path(args.out)
    if (out / "config.json").exists():
        print(f"VAE already trained: {out} (delete the folder to train again)")
        return
    check_writable(out.parent, "--out")                  # the folder is written whole at the end: fail now, not then
    torch.manual_seed(args.seed)
    images, skipped = load_images(sd_data.list_files(args.tars, [".tar"], "tar"), args.resolution, args.min_image_size)
    probe = images[:args.stat_images]                                    # fixed, for the scaling factor and PSNR
    # channels_last: a quarter less time per step on CPU (16 images: 93 against 120 ms on this project's 2 cores)
    vae = build_vae(args.channels, args.layers, args.groups).train().to(memory_format=torch.channels_last)
    # Start near-deterministic (posterior std e^-4 instead of 1): with unit noise on the latents the decoder first
    # learns the average color of everything, and the weak KL term takes thousands of steps to undo that.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0                 # log-variance channels
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, args.steps, args.warmup_steps))
    g = torch.Generator().manual_seed(args.seed)

    start, window = time.time(), []
    bar = tqdm(range(args.steps), desc="train VAE", unit="step")
    for step in bar:
        # (N, H, W, 3) images permuted to NCHW: already channels_last in memory, as the VAE's weights
        x = sd_data.images_to_tensor(images[torch.randint(len(images), (args.batch_size,), generator=g)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean()                                       # summed over latent elements, per image
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append((mse.item(), kl.item()))
        if (step + 1) % args.log_every == 0:
            mse_mean, kl_mean = np.mean(window, axis=0)
            bar.set_postfix(mse=f"{mse_mean:.4f}", kl=f"{kl_mean:.0f}")
            window.clear()
    seconds = time.time() - start

    vae.eval().to(memory_format=torch.contiguous_format)      # as every loader expects it
    std, psnr = latent_stats(vae, probe, args.batch_size)
    vae.register_to_config(scaling_factor=1.0 / std, sample_size=args.resolution)
    with atomic_folder(out) as tmp:
        vae.save_pretrained(tmp)
    sd_data.print_summary(f"demo VAE -> {out}", [
        ("images", len(images)), ("skipped: unusable image", skipped), ("steps", args.steps),
        ("batch size", args.batch_size), ("parameters", sum(p.numel() for p in vae.parameters())),
        ("downsampling", 2 ** (len(args.channels) - 1)), ("latent std before scaling", f"{std:.4f}"),
        ("scaling factor", f"{1.0 / std:.5f}"), ("reconstruction PSNR (dB)", f"{psnr:.1f}"),
        ("seconds", f"{seconds:.0f}")])


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--tars", default="data/demo/tars", help="input folder of webdataset tar shards")
    parser.add_argument("--out", default="data/demo/vae", help="output folder (diffusers AutoencoderKL layout)")
    parser.add_argument("--resolution", type=int, default=64, help="square image side, as encode_latents will use")
    parser.add_argument("--min_image_size", type=int, default=32, help="skip images whose shorter side is smaller")
    parser.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[8, 16, 32],
                        help="channels per level; n levels downsample 2^(n-1) times")
    parser.add_argument("--layers", type=int, default=1, help="ResNet blocks per level (the decoder has one more)")
    parser.add_argument("--groups", type=int, default=1, help="GroupNorm groups (divides every channel count)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (demo.run passes --vae_steps)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="images per step (at 8, twice the steps, one seed's VAE drew blue and cyan alike)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup_steps", type=int, default=50, help="linear LR warmup steps")
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the KL term (per-image sum)")
    parser.add_argument("--stat_images", type=int, default=512, help="images that measure the latent std and PSNR")
    parser.add_argument("--log_every", type=int, default=25, help="steps between progress-bar loss updates")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the batches and the posterior samples")
    run_main(main, parser.parse_args())
