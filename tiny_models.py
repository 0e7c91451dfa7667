"""Small frozen parts built and saved locally, so tests, benchmarks and the demo load them through the same
from_pretrained code paths as the real hub ids (no network): a CLIP tokenizer whose BPE covers a given word list, a small random
CLIPTextModel, and a small random AutoencoderKL."""
import json
from pathlib import Path

import torch

WORDS = ("a photo of the red green blue yellow circle square triangle on gray white black background cat dog "
         "in an with and forest city at night portrait man woman car").split()


def _bytes_to_unicode():
    """CLIP's reversible byte -> printable-unicode table (same as GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_tiny_tokenizer(out_dir, words=WORDS):
    """A CLIPTokenizer with every byte, plus merges that make each word in `words` a single token."""
    from transformers import CLIPTokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    # Replay BPE on each word (lowest-ranked known pair first, every occurrence at once) and add a merge for
    # the first pair only when no known one applies: merges made for "red" ("r e") would otherwise split "green".
    ranks = {}
    for w in dict.fromkeys(words):
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            pair = min(pairs, key=lambda q: ranks.get(q, len(ranks)))
            if pair not in ranks:
                ranks[pair] = len(ranks)
                vocab.append(pair[0] + pair[1])
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    merges = [" ".join(q) for q in ranks]
    vocab = list(dict.fromkeys(vocab + ["<|startoftext|>", "<|endoftext|>"]))
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out_dir)
    return tok


def save_tiny_clip(out_dir, hidden=32, layers=2, heads=2, words=WORDS, seed=0, mlp_ratio=2, word_std=None):
    """Tokenizer + random CLIPTextModel in one folder, as `openai/clip-vit-large-patch14` is laid out
    (hidden=768, layers=12, heads=12, mlp_ratio=4 is CLIP-L's text tower at full cost).

    word_std: draw the token embeddings at this std instead of CLIP's init (0.02, no larger than its position
    embeddings), under which a random CLIP barely tells words apart: at the demo's color-word position the 8 colors'
    outputs have mean cosine 0.80-0.92 (seeds 0-2), 0.26-0.35 with word_std=0.5. A trained CLIP's words are far apart."""
    from transformers import CLIPTextConfig, CLIPTextModel
    tok = save_tiny_tokenizer(out_dir, words)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * mlp_ratio,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPTextModel(cfg).eval()
    if word_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, word_std)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def save_tiny_vae(out_dir, seed=0, scaling_factor=0.18215, channels=(8, 16, 16, 16), layers=1, groups=8):
    """A random AutoencoderKL with one level per entry of `channels`: 4 levels are SD's factor-8 downsampling at a
    fraction of the width (SD's own VAE is channels=(128, 256, 512, 512), layers=2, groups=32), 3 the demo's 4x."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                        down_block_types=("DownEncoderBlock2D",) * len(channels),
                        up_block_types=("UpDecoderBlock2D",) * len(channels),
                        layers_per_block=layers, norm_num_groups=groups, sample_size=32, scaling_factor=scaling_factor)
    vae.eval().save_pretrained(out_dir)
    return Path(out_dir)
