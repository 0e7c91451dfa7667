"""configs/phases.yaml against its sources: the seed's from-scratch summary (phases 1-7) and NeMo's Stable
Diffusion stages table. Every expected value is written from those texts, not from the yaml. Pure: no model, no
data, only SD_Train's option parsing."""
import yaml

import SD_Train

PHASES_FILE = SD_Train.PHASES_FILE

SEED = [f"phase{i}" for i in range(1, 8)]
NEMO = ["nemo_pretrain_256", "sd11", "sd12", "sd15", "sd2_pretrain_256", "sd2_base_512"]


def resolve(name):
    return SD_Train.resolve_config(SD_Train.parse_args(["--phase", name, "--phases_file", str(PHASES_FILE)]))


def test_every_phase_resolves_with_the_seed_and_nemo_values():
    phases = yaml.safe_load(PHASES_FILE.read_text())
    assert set(SEED + NEMO + ["tiny", "demo"]) <= set(phases)
    cfg = {name: resolve(name) for name in phases}

    def cfgs(names):
        return [cfg[p] for p in names]

    def col(key, names):
        return [c[key] for c in cfgs(names)]

    # The seed (summary 003): 512 px, 24/GPU x 2 GPUs x accum 2 = 96, BF16 autocast without GradScaler.
    assert col("resolution", SEED) == [512] * 7
    assert col("batch_size", SEED) == [24] * 7
    assert [c["global_batch"] or c["batch_size"] * c["grad_accum"] * 2 for c in cfgs(SEED)] == [96] * 7
    assert col("precision", SEED) == ["auto"] * 7                  # auto = bf16 autocast on CUDA, no GradScaler
    assert col("lr", SEED) == [1e-5, 1e-5, 1e-5, 2e-6, 1.5e-6, 1e-6, 1e-6]
    assert col("warmup_steps", SEED) == [500, 500, 500, 200, 150, 100, 150]
    assert col("cfg_dropout", SEED) == [0.05, 0.05, 0.05, 0.15, 0.15, 0.15, 0.15]
    seed_epochs = [(1, 10), (11, 17), (18, 22), (23, 29), (30, 38), (39, 42), (43, 48)]
    assert all(a == b + 1 for (_, b), (a, _) in zip(seed_epochs, seed_epochs[1:]))
    assert col("epochs", SEED) == [last - first + 1 for first, last in seed_epochs] == [10, 7, 5, 7, 9, 4, 6]
    # samples per epoch: 0 = the whole dataset (1,315,411 LAION; 213,458 LAION HQ; ~705k DiffusionDB+JourneyDB;
    # 59,494 COCO people); phase 4's epoch drew 999k from 51,786 faces; phase 6 is 250k, phase 7 572k
    assert col("epoch_samples", SEED) == [0, 0, 0, 999_000, 0, 250_000, 572_000]
    assert [[d["ratio"] for d in c["datasets"]] for c in cfgs(SEED)] == \
        [[1.0]] * 5 + [[0.6, 0.2, 0.2], [0.37, 0.44, 0.09, 0.10]]

    def shares(phase):                                             # samples per source per epoch
        c = cfg[phase]
        ratios = [d["ratio"] for d in c["datasets"]]
        return [round(r / sum(ratios) * c["epoch_samples"]) for r in ratios]
    assert shares("phase6") == [150_000, 50_000, 50_000]           # LAION 150k + VGGFace2 50k + 50k of COCO's 58k
    assert sum(shares("phase7")) == 213_000 + 250_000 + 51_000 + 58_000   # LAION + DM + VGGFace2 + COCO = 572k
    assert col("min_snr_gamma", SEED) == [5.0, 5.0, 3.0, 3.0, 3.0, 3.0, 3.0]   # 5 to epoch 15, 3 from epoch 17
    assert col("val_ddim_steps", SEED) == [100] * 7                # "50 is insufficient for faces"
    assert col("init", SEED) == ["scratch"] + [f"runs/phase{i}/ema_final.safetensors" for i in range(1, 7)]

    # NeMo's stages (summary 000): global batch 8192 at 128/GPU (256 px) or 32/GPU (512 px), FP16 O1.
    assert col("resolution", NEMO) == [256, 512, 512, 512, 256, 512]
    assert col("batch_size", NEMO) == [128, 32, 32, 32, 128, 32]
    assert col("global_batch", NEMO) == [8192] * 6
    assert col("precision", NEMO) == ["fp16"] * 6
    assert col("lr", NEMO) == [1e-4] * 6
    assert col("warmup_steps", NEMO) == [10_000] * 6
    assert col("cfg_dropout", NEMO) == [0.1] * 6
    assert col("model", NEMO) == ["sd1"] * 4 + ["sd2"] * 2
    assert col("text_layer", NEMO) == ["last"] * 4 + ["penultimate"] * 2
    assert col("init", NEMO) == ["scratch", "runs/nemo_pretrain_256/ema_final.safetensors",
                                 "runs/sd11/ema_final.safetensors", "runs/sd12/ema_final.safetensors",
                                 "scratch", "runs/sd2_pretrain_256/ema_final.safetensors"]
    assert [[d["ratio"] for d in c["datasets"]] for c in cfgs(NEMO)] == [[1.0]] * 6
    samples_seen = [680_000_000, 409_000_000, 1_230_000_000, 1_320_000_000, 680_000_000, 1_320_000_000]
    dataset_size = [676_000_000, 39_500_000, 218_000_000, 218_000_000, 676_000_000, 218_000_000]
    assert col("epochs", NEMO) == [1, 10, 6, 6, 1, 6] == [round(s / n) for s, n in zip(samples_seen, dataset_size)]
    assert col("epoch_samples", NEMO) == [680_000_000, 40_900_000, 205_000_000, 220_000_000, 680_000_000,
                                          220_000_000]
    assert [c["epochs"] * c["epoch_samples"] for c in cfgs(NEMO)] == samples_seen
    assert all(0.9 < c["epoch_samples"] / n < 1.1 for c, n in zip(cfgs(NEMO), dataset_size))  # ~1 pass
    assert col("val_ddim_steps", NEMO) == [100] * 6

    # Loss weighting last (the option is new): the seed's Min-SNR, NeMo's plain eps loss.
    assert col("loss_weighting", SEED) == ["min_snr"] * 7
    assert col("loss_weighting", NEMO) == ["none"] * 6
