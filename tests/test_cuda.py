"""The CUDA paths, where a GPU is (`pytest -m cuda`; bench/gpu_check.sh runs them before its benchmarks): bf16 and
fp16 training steps against fp32, the SDPA kernel at SD1's head widths, compile + gradient checkpointing against
eager, fp16's non-finite skip with fused AdamW, no host sync in the sampling loop or the training loss, fp16
sampling against diffusers' image, and CUDA-graph sampling against eager.

Skipped without CUDA. `--cuda-device cpu` runs the ones that mean something on a CPU (bench/gpu_check.sh --cpu-dry
rehearses the GPU run so), and skips the CUDA-only properties (kernels, host syncs, CUDA graphs) with the reason."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import SD_Model as M
import SD_Train
from conftest import ROOT, diffusers_draw
from test_model import _random_small

sys.path.insert(0, str(ROOT / "bench"))
pytestmark = pytest.mark.cuda

PROMPT, NEGATIVE, SEED, STEPS, CFG = "a red circle on a gray background", "blue", 3, 10, 7.5


@pytest.fixture(scope="module")
def device(request):
    dev = torch.device(request.config.getoption("--cuda-device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    M.configure_cuda_backends()
    return dev


def cuda_only(device, why):
    if device.type != "cuda":
        pytest.skip(f"CUDA only: {why}")


@pytest.fixture
def no_tf32():
    """Exact fp32 for the comparisons that want it (configure_cuda_backends turns TF32 on for speed)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def training_batch(device, n=4, side=16, context_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = (torch.randn(n, 4, side, side, generator=g) for _ in range(2))
    t, context = torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 7, context_dim, generator=g)
    return x0.to(device), t.to(device), context.to(device), noise.to(device)


def loss_and_grads(unet, batch, dtype=None):
    """SD_Train's weighted diffusion loss and the gradients of one training step, under autocast(dtype) if given."""
    x0, t, context, noise = batch
    unet.zero_grad(set_to_none=True)
    with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype is not None):
        per_sample, weight = SD_Train.diffusion_loss(unet, M.NoiseSchedule(), x0, context, t, noise, "min_snr")
        loss = (per_sample * weight).mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in unet.parameters()])


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_mixed_precision_training_step_is_close_to_fp32(device, no_tf32, dtype, tol):
    unet = _random_small().to(device).train()
    batch = training_batch(device)
    loss32, grad32 = loss_and_grads(unet, batch)
    loss, grad = loss_and_grads(unet, batch, dtype)
    rel = ((grad - grad32).norm() / grad32.norm()).item()                # the whole gradient, as the optimizer sees it
    assert abs(loss - loss32) <= tol * abs(loss32) and rel <= 10 * tol, (loss, loss32, rel)
    assert torch.nn.functional.cosine_similarity(grad, grad32, dim=0) >= 1 - tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_runs_a_fused_kernel_at_every_sd1_head_width(device, dtype):
    """Heads of width 40, 80 and 160 (SD1's stages at 512 px, self- and cross-attention), forward and backward:
    flash, memory-efficient or cuDNN attention, never the math fallback (configure_cuda_backends turns it off, so
    a shape no fused kernel takes would fail here rather than silently run the O(L^2)-memory kernel)."""
    cuda_only(device, "which fused SDPA kernel CUDA picks")
    from kernel_profile import sdpa_table
    rows = sdpa_table(device, dtype)
    assert len(rows) == 6
    for where, width, which, forward, backward in rows:
        for ran in (forward, backward):
            assert ran and set(ran.split("+")) <= {"flash", "efficient", "cudnn"}, (where, width, which, ran)


def test_compile_with_gradient_checkpointing_gives_eager_gradients(device, no_tf32):
    """The configuration the largest batches train in: torch.compile (inductor; on a CPU aot_eager, which traces the
    same graphs in seconds where inductor's C++ takes many minutes) over non-reentrant checkpointing."""
    unet = _random_small().to(device).train()
    batch = training_batch(device, seed=1)
    loss_eager, grad_eager = loss_and_grads(unet, batch)
    unet.set_grad_checkpointing(True)
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="inductor" if device.type == "cuda" else "aot_eager")
    loss_c, grad_c = loss_and_grads(compiled, batch)
    unet.set_grad_checkpointing(False)
    rel = ((grad_c - grad_eager).norm() / grad_eager.norm()).item()
    assert abs(loss_c - loss_eager) <= 1e-5 * abs(loss_eager) and rel <= 1e-4, (loss_c, loss_eager, rel)


def test_fp16_non_finite_step_is_skipped_then_training_goes_on(device):
    """SD_Train.apply_step under fp16 autocast, GradScaler and fused AdamW (CUDA and CPU): an inf gradient (a finite
    loss: an fp16 overflow) leaves the weights and the EMA as they were and halves the loss scale; the next, finite
    step is taken by both."""
    unet = _random_small().to(device).train()
    names, params = zip(*[(n, p.detach()) for n, p in unet.named_parameters()])
    net = SimpleNamespace(unet=unet, params=params, ema=[p + 0.01 for p in params], names=names)  # EMA != weights
    cfg = {"lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0, "ema_decay": 0.9999}
    optimizer = SD_Train.build_optimizer(unet.parameters(), cfg)
    assert bool(optimizer.defaults["fused"]) == (device.type in ("cuda", "cpu"))  # (None, not False, torch 2.11)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
    batch = training_batch(device, seed=2)

    def step(poison):
        x0, t, context, noise = batch
        with torch.autocast(device.type, dtype=torch.float16):
            per_sample, weight = SD_Train.diffusion_loss(unet, M.NoiseSchedule(), x0, context, t, noise)
            loss = (per_sample * weight).mean()
        scaler.scale(loss).backward()
        if poison:
            next(unet.parameters()).grad.view(-1)[0] = float("inf")
        stats = torch.zeros(11, device=device)
        stats[0] = loss.detach()
        return SD_Train.apply_step(net, optimizer, scaler, stats, 0, cfg)

    before, ema_before = [p.clone() for p in params], [e.clone() for e in net.ema]
    stats, grad_norm, _ = step(poison=True)
    assert not np.isfinite(grad_norm) and np.isfinite(stats[0])
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, net.ema))
    assert scaler.get_scale() == 2.0 ** 9
    _, grad_norm, ok = step(poison=False)
    assert ok and np.isfinite(grad_norm)
    assert not all(torch.equal(a, b) for a, b in zip(before, params))
    assert not all(torch.equal(a, b) for a, b in zip(ema_before, net.ema))


def test_the_sampling_loop_and_the_training_loss_never_wait_for_the_gpu(device):
    """No host sync inside 50-step DDIM with CFG, nor in SD_Train's loss (torch.cuda's sync debug mode makes each
    one an error): the host runs ahead and the GPU never idles between steps."""
    cuda_only(device, "host syncs are a CUDA stream property")
    unet = _random_small().to(device, torch.float16).eval()
    cond, uncond = (torch.randn(2, 7, 32, device=device, dtype=torch.float16) for _ in range(2))
    x = torch.randn(2, 4, 16, 16, device=device)
    model_fn, schedule = M.cfg_model_fn(unet, cond, uncond, CFG), M.NoiseSchedule()
    batch = training_batch(device, seed=3)
    train = _random_small().to(device).train()
    SD_Train.diffusion_loss(train, schedule, batch[0], batch[2], batch[1], batch[3], "min_snr")  # tables to GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = M.sample_ddim(model_fn, x, schedule, 50)
        per_sample, weight = SD_Train.diffusion_loss(train, schedule, batch[0], batch[2], batch[1], batch[3],
                                                     "min_snr")
        (per_sample * weight).mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()


def draw(pipe, negative=NEGATIVE):
    return M.generate(pipe, [PROMPT], negative, STEPS, CFG, seed=SEED, height=64, width=64)[0].astype(np.float64)


def test_fp16_sampling_draws_diffusers_image(device, tiny_pipeline):
    """Ours in fp16 (UNet and VAE channels_last on CUDA) against diffusers' fp32 image, the reference: diffusers' own
    fp16 pipeline is no reference (under torch 2.11 on a CPU it drew 33 levels off its fp32 image, ours 0.05)."""
    ours = draw(M.load_pipeline(tiny_pipeline, device, torch.float16))
    theirs = diffusers_draw(tiny_pipeline, PROMPT, negative=NEGATIVE, steps=STEPS, guidance_scale=CFG, seed=SEED,
                            device=device)
    diff = np.abs(ours - theirs)
    assert diff.mean() <= 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


def test_cuda_graph_sampling_equals_eager(device, tiny_pipeline):
    """--compile reduce-overhead as SD_ImageGen.py runs it: the UNet compiled once and replayed as a CUDA graph at
    every step (no step falls back to eager), drawing the eager image."""
    cuda_only(device, "CUDA graphs")
    pipe = M.load_pipeline(tiny_pipeline, device, torch.float16)
    eager = draw(pipe)
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
    draw(pipe)                                       # compile, record the graph
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    graphed = draw(pipe)
    assert skips == 0
    diff = np.abs(graphed - eager)
    assert diff.mean() <= 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def test_encode_latents_on_the_device_stores_what_the_vae_gives(device, tmp_path):
    """encode_latents.py with one batch in flight (pinned copies back on CUDA) and a short last batch: every stored
    latent is the fp32 CPU VAE's latent of the same preprocessed image, within bf16's precision."""
    import argparse

    import encode_latents
    import sd_data
    import sd_latents
    from data_pipeline import make_jpeg
    from tiny_models import save_tiny_vae
    vae_dir, res = save_tiny_vae(tmp_path / "vae"), 64
    jpegs = {f"{i:09d}": make_jpeg(i, 80, 72) for i in range(7)}
    (tmp_path / "tars").mkdir()
    writer = sd_data.TarShardWriter(tmp_path / "tars" / "000000.tar")
    for key, data in jpegs.items():
        writer.write(key, data, "a caption")
    writer.close()
    args = argparse.Namespace(tars=str(tmp_path / "tars"), out=str(tmp_path / "latents"), vae=str(vae_dir),
                              resolution=res, batch_size=3, workers=1, chunk_size=2, prefetch_shards=1,
                              prefetch_batches=2, min_image_size=16, device=str(device), compile=False, buckets=False,
                              preview=0, preview_seed=0)
    encode_latents.main(args)
    assert sd_latents.existing_latent_keys(tmp_path / "latents") == set(jpegs)
    reference = M.FrozenVAE(vae_dir, device="cpu", dtype=torch.float32)
    for key, data in jpegs.items():
        image = torch.from_numpy(sd_data.load_image_square(data, res))[None]
        want = reference.encode(sd_data.images_to_tensor(image))[0]
        got = torch.from_numpy(sd_latents.read_latent(tmp_path / "latents", key).astype(np.float32))
        assert (got - want).abs().max() <= 0.03 * want.abs().max() + 1e-3, key
