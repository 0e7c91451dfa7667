"""Evaluate a checkpoint as NeMo and MLPerf do: FID and CLIP score on a caption set, one row per guidance scale
(the FID-vs-CLIP curve), or with --shapes the colour / shape prompt-following of the `make demo` model.

Reads top to bottom: the FID Inception network -> FID statistics and the Frechet distance -> CLIP score ->
prompts and images -> generation that resumes -> the evaluation loop -> CLI.

FID (Heusel et al. 2017) uses pool features of pytorch-fid's `pt_inception-2015-12-05` network, the TF
Inception graph behind the FIDs that MLPerf, NeMo and torchmetrics report. pytorch-fid, torch-fidelity and
clean-fid all pull in torchvision, which breaks transformers beside a CPU torch here, so the network is
written below with the state-dict names of that file: the real weights load strictly with
torch.load(weights_only=True).
"""
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import SD_Model as M
from sd_common import arg_parser, atomic_path, check_writable, pick_dtype, run_main, write_atomic
from SD_ImageGen import add_sampler_flags, save_png
from SD_ImageGen import main as imagegen_main

NEMO_GUIDANCE_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)   # NeMo's FID-vs-CLIP sweep
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


#################################################################################
#                            FID Inception network                              #
#################################################################################

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU: TF's conv unit, named as in torchvision."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's 3x3 average pool leaves the zero padding out of the mean; torchvision's counts it. This is the
    # difference between pytorch-fid's FIDInceptionA/C/E_1 and torchvision's blocks.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter bank. pool='max' is pytorch-fid's FIDInceptionE_2 (Mixed_7c): the TF graph max-pools
    there, unlike the paper and torchvision."""

    def __init__(self, cin, pool="avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
                          self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 for FID: images in [0, 1] -> (N, 2048) final average-pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)   # TF's 1008-way classifier: unused by FID, kept so the file loads strictly

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)   # (N, 3, 299, 299)
        x = 2 * x - 1                                             # the TF network's [-1, 1] input range
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))              # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                   # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                                  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                   # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))              # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))              # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                             # (N, 2048, 8, 8)
        return x.mean((2, 3))                                                          # (N, 2048)


def resolve_inception(spec):
    """--inception -> a local file: a path, a hub file 'owner/repo[/file.pth]', or (None) the torch hub cache
    where pytorch-fid leaves pt_inception-2015-12-05."""
    if spec is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not path.is_file():
            raise M.UserError(f"no FID Inception weights at {path}; download {INCEPTION_URL} "
                              "and pass --inception FILE")
        return path
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/")
    if spec.startswith((".", "/", "~")) or len(parts) < 2 or (len(parts) == 2 and path.suffix):
        raise M.UserError(f"FID Inception weights '{spec}' do not exist; download {INCEPTION_URL} "
                          "and pass --inception FILE")
    from huggingface_hub import hf_hub_download
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or INCEPTION_FILE
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:
        M.require_hub("FID Inception weights", spec, f"download {INCEPTION_URL} and pass --inception FILE")
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:   # offline, unknown repo or file: hub errors share no base class worth naming
        raise M.UserError(f"could not fetch FID Inception weights '{filename}' from hub repo '{repo}' "
                          f"({type(e).__name__}). Offline? Download {INCEPTION_URL} and pass --inception FILE"
                          ) from None


def load_inception(spec, device="cpu"):
    path = resolve_inception(spec)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise M.UserError(f"'{path}' is not a readable weights file ({type(e).__name__})") from None
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise M.UserError(f"'{path}' is not the pt_inception-2015-12-05 FID network: "
                          f"{' '.join(str(e).split())[:300]}") from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model, images):
    """uint8 (N, H, W, 3) -> float64 (N, 2048)."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255
    return model(x).double().cpu().numpy()


#################################################################################
#                      FID statistics and Frechet distance                      #
#################################################################################

def feature_stats(features):
    """(N, D) features -> (mean (D,), covariance (D, D)) in float64, as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise M.UserError(f"FID needs at least 2 images, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def _psd_eigvals(w):
    # Round-off leaves a singular covariance's zero eigenvalues at +-1e-16 x the largest; their square roots
    # would add up to a visible error, so they are zeroed.
    return np.where(w > len(w) * np.finfo(np.float64).eps * np.abs(w).max(), w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017). Tr (S1 S2)^1/2 equals Tr (A S2 A)^1/2
    with A = S1^1/2, a symmetric PSD matrix, so two eigh calls replace pytorch-fid's scipy.linalg.sqrtm, its
    complex round-off and its eps retry on singular covariances."""
    w, v = np.linalg.eigh(sigma1)
    a = (v * np.sqrt(_psd_eigvals(w))) @ v.T
    m = a @ sigma2 @ a
    tr_covmean = np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(features, mu_ref, sigma_ref):
    """FID of (N, D) features against reference statistics. With fewer images than dimensions the covariance
    is B^T B (B: centred features / sqrt(N - 1)) and Tr (S_ref B^T B)^1/2 = Tr (B S_ref B^T)^1/2, an N x N
    problem: exact, and quick for the small sets of a smoke run or a test."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    if n > d or n < 2:
        return frechet_distance(mu_ref, sigma_ref, *feature_stats(features))
    mu = features.mean(0)
    b = (features - mu) / np.sqrt(n - 1)                                              # (N, D)
    m = b @ sigma_ref @ b.T                                                           # (N, N)
    tr_covmean = np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma_ref) + (b * b).sum() - 2 * tr_covmean)


def save_stats(path, mu, sigma):
    """pytorch-fid's .npz layout (mu, sigma), so its precomputed reference files are interchangeable."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)


def load_stats(path):
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise M.UserError(f"'{path}' is not an FID statistics .npz with 'mu' and 'sigma' "
                          f"({type(e).__name__})") from None
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise M.UserError(f"'{path}' holds {mu.shape} / {sigma.shape} statistics, not Inception's 2048-d "
                          "pool features")
    return mu, sigma


#################################################################################
#                                  CLIP score                                   #
#################################################################################

class ClipScore:
    """CLIP score (Hessel et al. 2021, with torchmetrics' weight 100, as NeMo and MLPerf report it): per pair
    100 * max(cos(image, caption), 0), averaged by the caller. Images go through the model's own
    preprocessing (resize shorter side, centre crop, normalise); captions are cut at the text context."""

    def __init__(self, name, device="cpu"):
        # The PIL image processor: transformers' default one needs torchvision, which this venv must not have.
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
        name = str(name)
        self.model, info = M._from_pretrained(CLIPModel, name, "CLIP model", "--clip", "clip",
                                              output_loading_info=True)
        missing = sorted(info["missing_keys"])
        if missing:   # e.g. an SD text encoder: transformers would fill the rest in at random, silently
            raise M.UserError(f"'{name}' is not a whole CLIP model (text and vision towers): {len(missing)} "
                              f"weights missing, e.g. {missing[0]}; pass one with --clip")
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = M._from_pretrained(CLIPTokenizer, name, "CLIP tokenizer", "--clip", "tokenizer")
        self.processor = M._from_pretrained(CLIPImageProcessorPil, name, "CLIP image processor", "--clip",
                                            "feature_extractor")
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images, prompts):
        """uint8 (N, H, W, 3) and N captions -> (N,) scores."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                              max_length=self.model.config.text_config.max_position_embeddings).to(self.device)
        image_emb = self.model.get_image_features(pixel_values=pixels).pooler_output
        text_emb = self.model.get_text_features(**text).pooler_output
        cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        return (100 * cos.clamp(min=0)).cpu().numpy()


#################################################################################
#                              Prompts and images                               #
#################################################################################

def read_prompts(path, column="caption"):
    """Captions from a .txt (one per line), a COCO captions .json (the first caption of each image, in file
    order, as the 30k-caption COCO subsets take one per image), or a .csv / .tsv / .parquet column."""
    path = Path(path)
    if not path.is_file():
        raise M.UserError(f"prompt file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list):
            prompts = [str(p) for p in data]
        elif "annotations" in data:
            first = {}
            for a in data["annotations"]:
                first.setdefault(a["image_id"], a["caption"])
            prompts = list(first.values())
        else:
            raise M.UserError(f"'{path}' is neither a list of prompts nor COCO captions (no 'annotations')")
    elif suffix in (".csv", ".tsv", ".parquet"):
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            rows = table.column(column).to_pylist() if column in table.column_names else None
            names = table.column_names
        else:
            with open(path, newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                names = reader.fieldnames or []
                rows = [r[column] for r in reader] if column in names else None
        if rows is None:
            raise M.UserError(f"'{path}' has no column '{column}' (it has {names}); pass --caption_column")
        prompts = [str(p) for p in rows if p is not None]
    else:
        prompts = path.read_text().splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise M.UserError(f"no prompts in '{path}'")
    return prompts


def load_image(path, size):
    """An RGB uint8 (size, size, 3) array: centre square crop, then bicubic resize (a no-op for our own
    images), so reference photos of any shape meet generated ones at the same resolution."""
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return np.asarray(img.resize((size, size), Image.BICUBIC))


def image_batches(paths, size, batch_size):
    for k in range(0, len(paths), batch_size):
        yield k, np.stack([load_image(p, size) for p in paths[k:k + batch_size]])


def reference_stats(args, inception, size):
    """FID statistics of the real images: a pytorch-fid .npz as is, or a folder through the Inception net
    (unreadable files are skipped and counted, not fatal hours into a run)."""
    ref = Path(args.ref_images)
    if ref.is_file():
        return load_stats(ref)
    feats, batch, skipped = [], [], 0
    for path in sorted(p for p in ref.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            batch.append(load_image(path, size))
        except OSError:   # PIL's UnidentifiedImageError and truncated files are OSErrors
            skipped += 1
        if len(batch) == args.batch_size:
            feats.append(inception_features(inception, np.stack(batch)))
            batch = []
    if batch:
        feats.append(inception_features(inception, np.stack(batch)))
    feats = np.concatenate(feats) if feats else np.zeros((0, 2048))
    if len(feats) < 2:
        raise M.UserError(f"--ref_images '{ref}' has {len(feats)} readable images ({' '.join(IMAGE_SUFFIXES)}); "
                          "FID needs at least 2")
    print(f"reference: {len(feats)} images from {ref}" + (f", {skipped} unreadable skipped" if skipped else ""))
    mu, sigma = feature_stats(feats)
    if args.save_ref_stats:
        save_stats(args.save_ref_stats, mu, sigma)
        print(f"wrote reference statistics to {args.save_ref_stats}")
    return mu, sigma


#################################################################################
#                          Generation that resumes                              #
#################################################################################

def generation_settings(args, prompts, resolution):
    """What decides the pixels of image i: a rerun into the same --out must match it, or the saved images
    would silently mix two models."""
    return dict(ckpt=str(args.ckpt), weights=args.weights, vae=args.vae, text_encoder=args.text_encoder,
                sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, negative=args.negative,
                resolution=resolution, batch_size=args.batch_size, dtype=args.dtype,
                prompts_sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest())


def check_settings(out, settings):
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise M.UserError(f"'{out}' holds images made with other settings {changed} (old, new); "
                              f"pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=2))


def generate_missing(pipe, prompts, folder, scale, args, resolution, width=None):
    """Sample every image of `folder` not yet on disk (image i has prompt i) and return how many were drawn.
    Images (resolution high, `width` or resolution wide) come in fixed chunks of --batch_size whose noise is seeded
    with seed + the chunk's first index, so a resumed run draws exactly what an uninterrupted one would have."""
    from tqdm import tqdm
    n, bs = len(prompts), args.batch_size
    paths = [folder / f"{i:05d}.png" for i in range(n)]
    todo = [k for k in range(0, n, bs) if not all(p.exists() for p in paths[k:k + bs])]
    made = 0
    for k in tqdm(todo, desc=f"cfg {scale:g}", disable=not todo):
        chunk = prompts[k:k + bs]
        images = M.generate(pipe, chunk, args.negative, args.steps, scale, args.sampler, args.eta, args.seed + k,
                            resolution, width or resolution, progress=True)
        for i, (image, prompt) in enumerate(zip(images, chunk), start=k):
            if not paths[i].exists():
                # Written under a temp name first: an interrupted write never counts as a finished image.
                with atomic_path(paths[i], fsync=False) as tmp:
                    save_png(image, tmp, dict(prompt=prompt, index=i, seed=args.seed + k, guidance_scale=scale,
                                              steps=args.steps, sampler=args.sampler, checkpoint=args.ckpt))
                made += 1
    return paths, made


#################################################################################
#                                  Evaluation                                   #
#################################################################################

def fid_clip_rows(args, pipe, prompts, scales, resolution, inception, clip, ref):
    """One row per guidance scale: FID against the reference statistics (when given) and the mean CLIP score."""
    rows = []
    for scale in scales:
        paths, made = generate_missing(pipe, prompts, Path(args.out) / f"cfg_{scale:g}", scale, args, resolution)
        feats, scores = [], []
        for k, batch in image_batches(paths, resolution, args.batch_size):
            scores.append(clip(batch, prompts[k:k + len(batch)]))
            if inception:
                feats.append(inception_features(inception, batch))
        rows.append(dict(guidance_scale=scale, images=len(paths), generated=made, reused=len(paths) - made,
                         fid=fid(np.concatenate(feats), *ref) if inception else None,
                         clip_score=float(np.concatenate(scores).mean())))
    return rows


def write_results(out, rows, settings):
    """results.json (rows + settings), results.csv and results.md; returns the markdown table."""
    write_atomic(out / "results.json", json.dumps(dict(settings=settings, rows=rows), indent=2))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| guidance | images | generated | reused | FID | CLIP score |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fid = "-" if r["fid"] is None else f"{r['fid']:.2f}"
        lines.append(f"| {r['guidance_scale']:g} | {r['images']} | {r['generated']} | {r['reused']} | {fid} | "
                     f"{r['clip_score']:.2f} |")
    table = "\n".join(lines) + "\n"
    write_atomic(out / "results.md", table)
    return table


def shapes_prompt_following(args, pipe, prompts, scale, height, width, folder):
    """(color, shape) accuracy of the demo world's fixed-rule classifier on images of its prompts, drawn
    width x height (the rule reads any aspect)."""
    from PIL import Image
    from demo import shapes
    paths, _ = generate_missing(pipe, prompts, folder, scale, args, height, width)
    images = []
    for p in paths:
        with Image.open(p) as img:
            images.append(np.asarray(img.convert("RGB")))
    return shapes.score(images, prompts)


def run(args, device):
    if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise M.UserError("--batch_size and --num_images must be at least 1")
    if (args.height or args.width) and not args.shapes:
        raise M.UserError("--height / --width draw the demo's shapes at another aspect (with --shapes); FID and CLIP "
                          "score compare square images: use --resolution")
    if args.shapes:
        from demo import shapes
        scales = args.guidance_scales or [7.5]
        if len(scales) != 1:
            raise M.UserError("--shapes scores one guidance scale; pass a single --guidance_scales value")
        prompts = [p for p in shapes.prompt_grid() for _ in range(args.shapes_seeds)]   # every color x shape
    else:
        scales = args.guidance_scales or list(NEMO_GUIDANCE_SCALES)
        if not args.prompts:
            raise M.UserError("pass --prompts FILE (captions to generate from), or --shapes for the demo world")
        prompts = read_prompts(args.prompts, args.caption_column)
        n = args.num_images or len(prompts)
        prompts = [prompts[i % len(prompts)] for i in range(n)]   # fewer captions than images: cycle them
    # Every input that can be wrong is checked before hours of sampling.
    if args.ref_images and not (Path(args.ref_images).is_dir() or Path(args.ref_images).is_file()):
        raise M.UserError(f"--ref_images '{args.ref_images}' is neither a folder of images nor a statistics .npz")
    if args.save_ref_stats and not (args.ref_images and Path(args.ref_images).is_dir()):
        raise M.UserError("--save_ref_stats writes the statistics of a --ref_images folder; pass one")
    M.check_sampling_args(args.height or args.resolution, args.width or args.resolution, args.sampler, args.steps,
                          eta=args.eta)
    check_writable(args.out, "--out")
    inception = load_inception(args.inception, device) if args.ref_images and not args.shapes else None
    clip = None if args.shapes else ClipScore(args.clip, device)
    pipe = M.load_pipeline(args.ckpt, device, pick_dtype(device, args.dtype), args.weights, args.vae,
                           args.text_encoder)
    resolution = args.resolution or pipe.meta.get("resolution", 512)
    args.sampler = args.sampler or M.default_sampler(pipe.schedule)   # recorded in settings.json and every PNG
    ref = reference_stats(args, inception, resolution) if inception else None
    out = Path(args.out) / "shapes" if args.shapes else Path(args.out)   # own settings: both can share --out
    height, width = args.height or resolution, args.width or resolution
    settings = generation_settings(args, prompts, resolution)
    if (height, width) != (resolution, resolution):
        settings["size"] = f"{width}x{height}"
    check_settings(out, settings)

    if args.shapes:
        color_acc, shape_acc = shapes_prompt_following(args, pipe, prompts, scales[0], height, width, out)
        print(f"prompt-following: color {color_acc:.2f} shape {shape_acc:.2f}" +
              (f" ({width}x{height})" if "size" in settings else ""))
        return color_acc, shape_acc
    rows = fid_clip_rows(args, pipe, prompts, scales, resolution, inception, clip, ref)
    table = write_results(out, rows, settings)
    print(f"\n{args.ckpt} at {resolution}px, {len(prompts)} images per scale, {args.steps} {args.sampler} steps\n")
    print(table + f"\nwrote {out / 'results.md'}, results.csv, results.json")
    return rows


def main(args):
    imagegen_main(args, run)


def build_parser():
    p = arg_parser(__doc__)
    p.add_argument("--ckpt", required=True,
                   help="our checkpoint (.pt/.safetensors), a diffusers UNet or pipeline folder, or an original "
                        "single file")
    p.add_argument("--prompts", default=None,
                   help="captions: .txt (one per line), COCO captions .json, or .csv/.tsv/.parquet "
                        "(--caption_column)")
    p.add_argument("--caption_column", default="caption", help="caption column of a .csv/.tsv/.parquet prompt file")
    p.add_argument("--num_images", type=int, default=None, help="images per guidance scale (default: one per caption)")
    p.add_argument("--ref_images", default=None,
                   help="real images for FID: a folder, or a pytorch-fid statistics .npz (mu, sigma); none = no FID")
    p.add_argument("--save_ref_stats", default=None, help="write the reference folder's statistics to this .npz")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=None,
                   help="one FID/CLIP row per scale (default: NeMo's "
                        f"{' '.join(f'{s:g}' for s in NEMO_GUIDANCE_SCALES)}; 7.5 with --shapes)")
    p.add_argument("--resolution", type=int, default=None,
                   help="generated (and reference) image size; NeMo evaluates at 256 or 512 "
                        "(default: the training resolution)")
    p.add_argument("--height", type=int, default=None,
                   help="with --shapes: image height, to score another aspect (default: --resolution)")
    p.add_argument("--width", type=int, default=None,
                   help="with --shapes: image width, to score another aspect (default: --resolution)")
    p.add_argument("--batch_size", type=int, default=16, help="images per sampling / Inception / CLIP batch")
    p.add_argument("--out", default="outputs/eval", help="images per scale (reruns skip finished ones) and results")
    p.add_argument("--inception", default=None,
                   help=f"FID Inception weights: a {INCEPTION_FILE} file or hub 'owner/repo[/file]' "
                        "(default: the torch hub cache, where pytorch-fid keeps it)")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP model hub id or folder for CLIP score")
    p.add_argument("--shapes", action="store_true",
                   help="instead of FID/CLIP: colour and shape prompt-following on the `make demo` shapes world")
    p.add_argument("--shapes_seeds", type=int, default=4, help="seeds per colour x shape prompt with --shapes")
    p.add_argument("--negative", default="", help="negative prompt: replaces the empty prompt in the CFG branch")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the first chunk's noise; chunk k uses seed + k")
    add_sampler_flags(p)
    p.add_argument("--weights", default="ema", choices=["ema", "live"], help="which weights of a training checkpoint")
    p.add_argument("--vae", default=None, help="VAE hub id or folder (default: the one the checkpoint names)")
    p.add_argument("--text_encoder", default=None,
                   help="text encoder + tokenizer hub id or folder (default: the checkpoint's)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="sampling dtype (default: fp16 on CUDA, fp32 on CPU); Inception and CLIP run in fp32")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    return p


if __name__ == "__main__":
    run_main(main, build_parser().parse_args())
