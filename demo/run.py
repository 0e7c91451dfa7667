"""`make demo`: the real pipeline end to end, offline, on generated colored shapes, on CPU, ending with a
prompt-following score.

Runs the same scripts users run, in order, each as its own process with the flags printed: generate the
images and their LAION-schema metadata -> serve them on 127.0.0.1 -> 02_filter_metadata.py ->
03_download_images.py (img2dataset) -> 04_preprocess_to_cache.py -> 05_build_hf_dataset.py -> train the demo
VAE -> encode_latents.py -> torchrun SD_Train.py --phase demo (gloo) -> SD_ImageGen.py: a grid of every color
x shape prompt -> evaluate.py --shapes: the score. Everything lands under --root; a re-run reuses every
finished step (each script resumes on its own), so deleting --root is the way to start over.

--bucketed is the same world with aspect-ratio buckets end to end: images alternate landscape and portrait
(96x64 and 64x96 at the default --resolution 64), 03 keeps their aspect, encode_latents.py --buckets encodes each
at its bucket, SD_Train.py trains the `demo_bucketed` phase (buckets: true), and the grid and the score are drawn at
both aspects.

    python -m demo.run
    python -m demo.run --prediction_type flow --loss_weighting none --score_steps 5 10 25 50   # same data, own run
    python -m demo.run --bucketed          # -> data/demo_bucketed
"""
import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import sd_data
from sd_common import UserError, arg_parser, check_writable, require_positive, run_main
from demo import shapes
from SD_Model import LOSS_WEIGHTINGS, SAMPLERS, sampler_fits

REPO = Path(__file__).resolve().parents[1]
DEMO_VAE_FACTOR = 4                          # demo/train_vae.py's default: 3 levels, 4x downsampling


def bucketed_sizes(res):
    """The bucketed demo's image sizes, landscape and portrait 3:2 with shorter side `res`, and the base resolution
    whose aspect buckets (sd_data.aspect_buckets, sides multiples of 8 latent px) are exactly those two."""
    sizes = [(res * 3 // 2, res), (res, res * 3 // 2)]
    base = 16 * math.ceil(math.sqrt(sizes[0][0] * sizes[0][1]) / 16)
    if sorted(sd_data.aspect_buckets(base, sd_data.BUCKET_LATENT_MULTIPLE * DEMO_VAE_FACTOR)) != sorted(sizes):
        raise SystemExit(f"--bucketed: {sizes[0][0]}x{res} and {res}x{sizes[0][0]} are not the aspect buckets of any "
                         f"base near {base} px (with the demo VAE's 32-px multiples); use --resolution 64")
    return sizes, base


def folders(root, prediction_type="epsilon"):
    """Every input and output of the demo, by name. latents/, captions/ and clip/ are what the `demo` phase in
    configs/phases.yaml reads when --root is left at data/demo. Another objective than eps trains, samples and
    scores in folders of its own (run_flow/, ...) on the same data."""
    root = Path(root)
    names = ["www", "meta", "filtered", "tars", "tokens", "captions", "clip", "vae", "latents"]
    own = "" if prediction_type == "epsilon" else f"_{prediction_type}"
    return argparse.Namespace(root=root, **{n: root / n for n in names},
                              **{n: root / f"{n}{own}" for n in ("run", "samples", "eval")})


def script_steps(args, d):
    """(title, argv) of each script run, in order, the scores last: exactly what a user would type for this data
    set. Images are `res` px square, or with --bucketed `res` px on their shorter side, encoded and trained at the
    base `base`; the grid and the score are drawn at each image size."""
    py, res, seed = sys.executable, str(args.resolution), str(args.seed)
    sampler = args.sampler or ("flow_euler" if args.prediction_type == "flow" else "dpmpp_2m")
    objective = ["--prediction_type", args.prediction_type] + \
        (["--loss_weighting", args.loss_weighting] if args.loss_weighting else [])
    sizes, base = bucketed_sizes(args.resolution) if args.bucketed else ([(args.resolution,) * 2], args.resolution)
    buckets = ["--buckets"] if args.bucketed else []
    train = ["--phase", "demo_bucketed" if args.bucketed else "demo"] + \
        (["--max_steps", str(args.max_steps)] if args.max_steps else [])
    ckpt = d.run / "ema_final.safetensors"
    named = [(f"{w}x{h}" if args.bucketed else "", ["--width", str(w), "--height", str(h)] if args.bucketed else [])
             for w, h in sizes]
    return [
        ("02 filter metadata", [py, "02_filter_metadata.py", "--meta", d.meta, "--out", d.filtered,
                                "--preset", "phase1", "--min_width", res, "--min_height", res]),
        ("03 download images (img2dataset)", [py, "03_download_images.py", "--meta", d.filtered, "--out", d.tars,
                                              "--resolution", res, "--min_image_size", res, "--processes", "1",
                                              "--threads", "16", "--shard_size", "1000", "--timeout", "10",
                                              *buckets]),
        ("04 captions -> CLIP token ids", [py, "04_preprocess_to_cache.py", "--tars", d.tars, "--out", d.tokens,
                                           "--text_encoder", d.clip, "--min_image_size", res, "--workers", "2"]),
        ("05 caption dataset (train / validation)", [py, "05_build_hf_dataset.py", "--batches", d.tokens,
                                                     "--out", d.captions, "--val_fraction", "0.02",
                                                     "--tars", d.tars]),
        ("train the demo VAE", [py, "-m", "demo.train_vae", "--tars", d.tars, "--out", d.vae, "--resolution", res,
                                "--steps", str(args.vae_steps), "--seed", seed]),
        ("encode latents", [py, "encode_latents.py", "--tars", d.tars, "--out", d.latents, "--vae", d.vae,
                            "--resolution", str(base), "--device", "cpu", "--workers", "1", "--batch_size", "64",
                            "--min_image_size", res, *buckets]),
        ("train the UNet (torchrun, gloo)", [py, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", str(args.nproc), "SD_Train.py", *train,
                                             "--resume", "auto", "--datasets", f"{d.latents}:{d.captions}",
                                             "--text_encoder", d.clip, "--resolution", str(base), "--seed", seed,
                                             "--out_dir", d.run, *objective]),
    ] + [(f"sample the prompt grid {name}".strip(),
          [py, "SD_ImageGen.py", "--ckpt", ckpt, "--prompts", d.samples / "prompts.txt", "--n", str(args.n), "--grid",
           "--sampler", sampler, "--steps", str(args.steps), "--guidance_scale", str(args.guidance_scale),
           "--seed", seed, "--device", "cpu",
           *size, "--out", d.samples / f"grid{'_' * bool(name)}{name}.png"]) for name, size in named
    ] + [(f"evaluate.py: prompt-following score{' ' * bool(name)}{name}, {n} steps",
          [py, "evaluate.py", "--ckpt", ckpt, "--shapes", "--shapes_seeds", str(args.n), "--sampler", sampler,
           "--steps", str(n),
           "--guidance_scales", str(args.guidance_scale), "--seed", seed, "--device", "cpu", *size,
           "--out", d.eval / name / f"steps_{n}"]) for name, size in named for n in args.score_steps or [args.steps]]


def run_script(title, argv, timings):
    """Run one step as its own process (output streamed), timed; stop the demo if it fails."""
    argv = [str(a) for a in argv]
    print(f"\n=== {title}\n$ {' '.join(argv[1:] if argv[0] == sys.executable else argv)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1",
               TOKENIZERS_PARALLELISM="false")
    start = time.time()
    if subprocess.run(argv, cwd=REPO, env=env).returncode != 0:
        raise SystemExit(f"make demo: step '{title}' failed (its output is above)")
    timings.append((title, time.time() - start))


def served_port(meta_file):
    """The port an earlier run's metadata points at (its URLs must stay valid for 03 to resume), else 0 (any)."""
    if not meta_file.exists():
        return 0
    import pyarrow.parquet as pq
    return urlparse(pq.read_table(meta_file, columns=["url"]).column("url")[0].as_py()).port


def save_demo_clip(out, seed):
    """The demo's text encoder: a tokenizer that knows every caption word and a random 64-d CLIP (the demo UNet's
    context) whose words are drawn far apart, as a trained CLIP's are: with CLIP's own init the 8 colors came out
    nearly alike and the UNet learned them at half the rate (color 0.22 vs 0.44 after 728 steps)."""
    from tiny_models import save_tiny_clip
    return save_tiny_clip(out, hidden=64, layers=2, heads=2, words=shapes.WORDS, seed=seed, word_std=0.5)


def main(args):
    # before minutes of data and training
    require_positive(args, "images", "resolution", "vae_steps", "nproc", "n", "steps", "score_steps")
    if args.seed < 0 or args.max_steps < 0:
        raise UserError(f"--seed and --max_steps must be 0 or more, got {args.seed} and {args.max_steps}")
    if args.sampler and not sampler_fits(args.sampler, args.prediction_type == "flow"):
        raise UserError(f"--sampler {args.sampler} cannot sample a model trained with --prediction_type "
                        f"{args.prediction_type}; leave --sampler out for the default")
    d = folders(check_writable(args.root, "--root"), args.prediction_type)
    steps = dict(script_steps(args, d))
    timings, start = [], time.time()
    sizes = bucketed_sizes(args.resolution)[0] if args.bucketed else args.resolution
    print(f"make demo: {args.images} generated " + (" and ".join(f"{w}x{h}" for w, h in sizes) if args.bucketed else
                                                     f"{args.resolution} px") +
          f" images -> the whole pipeline -> a score; everything under {d.root}/")

    # The data set and its download: images served on 127.0.0.1, the metadata pointing at them.
    meta_file = d.meta / "part-00000.parquet"
    with sd_data.LoopbackServer(d.www, port=served_port(meta_file)) as server:
        print(f"\n=== generate the data set\nserving {d.www} at {server.url}")
        if meta_file.exists():
            print(f"already generated: {meta_file}")
        else:
            t = time.time()
            shapes.write_dataset(d.www, meta_file, args.images, args.seed, sizes, server.url)
            timings.append(("generate the data set", time.time() - t))
            print(f"wrote {args.images} images to {d.www} and their metadata to {meta_file}")
        for title in ("02 filter metadata", "03 download images (img2dataset)"):
            run_script(title, steps.pop(title), timings)

    # The frozen text encoder: a tokenizer whose vocabulary holds every caption word, and a random CLIP.
    print(f"\n=== the demo's CLIP text encoder\n{d.clip}")
    if not (d.clip / "config.json").exists():
        t = time.time()
        save_demo_clip(d.clip, args.seed)
        timings.append(("CLIP text encoder", time.time() - t))
    prompts_file = d.samples / "prompts.txt"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(shapes.prompt_grid()) + "\n")
    scores = {title: steps.pop(title) for title in list(steps) if title.startswith("evaluate.py")}
    for title, argv in steps.items():
        run_script(title, argv, timings)
    sd_data.print_summary(f"make demo: {time.time() - start:.0f} s until the score",
                          [(t, f"{s:.0f} s") for t, s in timings])
    print(f"prompt grid (a row per prompt, {args.n} seeds): " + ", ".join(str(p) for p in sorted(d.samples.glob(
        "grid*.png"))))

    # Last, the score: every color x shape prompt, args.n seeds each, through the fixed-rule classifier (at each
    # aspect with --bucketed).
    for title, argv in scores.items():
        run_script(title, argv, timings)


if __name__ == "__main__":
    parser = arg_parser(__doc__)
    parser.add_argument("--root", default=None,
                        help="folder for every input and output of the demo (default: data/demo, or "
                             "data/demo_bucketed with --bucketed)")
    parser.add_argument("--bucketed", action="store_true",
                        help="aspect-ratio buckets end to end: landscape and portrait images, trained bucketed, "
                             "scored at both aspects")
    parser.add_argument("--images", type=int, default=3000, help="generated images")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of everything random: the data set, the CLIP and VAE inits, the UNet's training "
                             "(init, order, noise) and the sampling noise of the grid and the score")
    parser.add_argument("--resolution", type=int, default=64,
                        help="image side in pixels (with --bucketed: the shorter side of 3:2 and 2:3 images)")
    parser.add_argument("--vae_steps", type=int, default=1000, help="optimizer steps of the demo VAE")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    parser.add_argument("--n", type=int, default=4, help="seeds per prompt in the grid and the score")
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                        help="sampler of the grid and the score, as SD_ImageGen.py --sampler (default: dpmpp_2m, "
                             "flow_euler for --prediction_type flow)")
    parser.add_argument("--steps", type=int, default=15,
                        help="sampling steps of the grid and the score (DPM-Solver++(2M) 15 scored as DDIM 25)")
    parser.add_argument("--score_steps", type=int, nargs="+", default=None,
                        help="score once per step count instead (eval/steps_N each): how many steps each objective "
                             "needs")
    parser.add_argument("--guidance_scale", type=float, default=2.0,
                        help="classifier-free guidance scale of the grid and the score (3 and more drew the squares "
                             "rounder)")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "flow"],
                        help="the UNet's objective (SD_Train.py --prediction_type); not eps: run, samples and eval "
                             "go to run_<type>/ ... on the same data")
    parser.add_argument("--loss_weighting", default=None, choices=LOSS_WEIGHTINGS,
                        help="SD_Train.py --loss_weighting (default: the demo phase's, min_snr; SD3's flow loss: none)")
    parser.add_argument("--max_steps", type=int, default=0,
                        help="stop the UNet after this many optimizer steps (0: the phase's epochs; a smoke run)")
    args = parser.parse_args()
    args.root = args.root or ("data/demo_bucketed" if args.bucketed else "data/demo")
    run_main(main, args)
