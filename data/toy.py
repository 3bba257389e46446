"""The toy world's task (--data toy) and its CLIP: the pretraining recipe, the shipped weights, their digest.

The task: fine-tune on toy_world's `photo` style, test on `photo` and five shifted styles named
after the ImageNet sets they play (toy-v2, toy-sketch, toy-r, toy-a, toy-c); 3,000 test images per
split keep one standard error under 1 point (0.91 at worst, at 50%).

The paper fine-tunes CLIP weights pretrained elsewhere (OpenAI's, on 400M web pairs). The toy
job does the same: `python -m data.toy` pretrains the `toy` preset on toy_world's web corpus
once, and the result ships as assets/toy-clip.safetensors (fp16), which `--model toy` loads
after checking its SHA-256, as a downloaded checkpoint would be checked.

Pretraining is CLIP's (Radford et al., ICML 2021, Sec. 2.5) in miniature: symmetric InfoNCE with
the learned logit scale clamped at 100, AdamW with linear warm-up and cosine decay, and no weight
decay on gains, biases, the class token and the logit scale (as open_clip does).

    python -m data.toy                       # rebuild (about 15 min on 2 CPU cores), print the digest
    python train.py --model runs/toy-clip.safetensors   # fine-tune a rebuilt one
"""

import argparse
import hashlib
import math
import time
from pathlib import Path

import torch
from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip
from tqdm import tqdm

from clip_model import CLIP, CLIP_MEAN, CLIP_STD, PRESETS, tokenize
from clip_weights import load_clip, save_clip
from data import DataError, EvalSet, TaskData, toy_world
from mpm_nce import infonce_loss

SIZES = dict(train_per_class=1000, test_per_class=250)
OOD = {"v2": "toy-v2", "sketch": "toy-sketch", "rendition": "toy-r", "adversarial": "toy-a", "corrupt": "toy-c"}

TOY_PRETRAIN = dict(pairs=100_000, steps=1500, batch_size=256, lr=1e-3, warmup=100, weight_decay=0.1, seed=0)
TOY_CLIP = Path(__file__).resolve().parents[1] / "assets" / "toy-clip.safetensors"
TOY_CLIP_SHA256 = "50e99c226e5808b3e26d3ebb76d603d68a03a7aa34fb5c05956a4055f65ae6bd"


def task(shots=None, seed=0, flip=False):
    """--data toy: generated in memory, deterministic; 32 px images, already tensors; flip: --flip in training."""
    normalize = Normalize(CLIP_MEAN, CLIP_STD)

    def split(style, part, per_class=SIZES["test_per_class"], transform=normalize):
        return toy_world.ToySplit(style, per_class, seed=seed, split=part, transform=transform)

    ood = [EvalSet(name, split(style, "test")) for style, name in OOD.items()]
    augment = Compose([RandomHorizontalFlip(), normalize]) if flip else normalize  # a mirrored shape keeps its class
    train = split("photo", "train", shots or SIZES["train_per_class"], augment)
    return TaskData(
        list(toy_world.CLASSNAMES), list(toy_world.TEMPLATES), train, EvalSet("toy-photo", split("photo", "test")), ood
    )


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_toy_clip(device="cpu", path=TOY_CLIP, digest=TOY_CLIP_SHA256):
    """The shipped toy CLIP, after checking that its bytes are the published ones."""
    if not path.exists():
        raise DataError(
            f"{path}: the toy CLIP is missing; restore it with `git checkout -- {path.name}` "
            f"in {path.parent}, or rebuild it with `python -m data.toy` and pass --model PATH"
        )
    found = sha256(path)
    if found != digest:
        raise DataError(
            f"{path}: SHA-256 {found[:16]}..., expected {digest[:16]}...: the file is damaged or "
            "was replaced; restore it with git, or pass a rebuilt one with --model PATH"
        )
    return load_clip(path, device=device)


def normalise(images):
    """uint8 [N, 3, H, W] -> float, normalised as every CLIP input is."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def zero_shot_photo(model, test):
    """Zero-shot top-1 (%) on toy-photo test: the number the pretraining is for."""
    texts = [t.format(c) for c in toy_world.CLASSNAMES for t in toy_world.TEMPLATES]
    g = model.encode_text(tokenize(texts, model.config.context_length), normalize=True)
    classifier = torch.nn.functional.normalize(
        g.view(len(toy_world.CLASSNAMES), len(toy_world.TEMPLATES), -1).mean(1), dim=-1
    )  # [C, e]
    f = torch.cat([model.encode_image(x, normalize=True) for x in normalise(test.images).split(1000)])
    return 100 * (f @ classifier.T).argmax(1).eq(torch.tensor(test.labels)).float().mean().item()


def lr_at(step, p):
    if step < p["warmup"]:
        return p["lr"] * (step + 1) / p["warmup"]
    return 0.5 * p["lr"] * (1 + math.cos(math.pi * (step - p["warmup"]) / max(1, p["steps"] - p["warmup"])))


def pretrain(p=TOY_PRETRAIN, eval_every=500):
    """The toy CLIP, pretrained on p['pairs'] web pairs for p['steps'] steps; seeded, so a rerun with
    the same torch build and thread count gives the same weights."""
    torch.manual_seed(p["seed"])
    model = CLIP(PRESETS["toy"]).train()
    web = toy_world.WebCorpus(p["pairs"], seed=p["seed"])
    images, tokens = normalise(web.images), tokenize(web.captions, model.config.context_length)  # [n,3,32,32], [n,L]
    test = toy_world.ToySplit("photo", 250, split="test") if eval_every else None
    no_decay = {n for n, q in model.named_parameters() if q.ndim < 2 or n == "visual.cls_token"}
    groups = [[q for n, q in model.named_parameters() if (n in no_decay) == skip] for skip in (False, True)]
    optimizer = torch.optim.AdamW(
        [{"params": groups[0], "weight_decay": p["weight_decay"]}, {"params": groups[1], "weight_decay": 0.0}],
        lr=p["lr"],
    )
    order = torch.randperm(len(images))
    for step in tqdm(range(p["steps"]), desc="pretraining the toy CLIP", mininterval=10):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, p)
        idx = order[torch.arange(step * p["batch_size"], (step + 1) * p["batch_size"]) % len(order)]
        f, g, s = model(images[idx], tokens[idx])
        loss = infonce_loss(f, g, tau=1 / s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            tqdm.write(
                f"step {step + 1}: InfoNCE {loss.item():.3f}, zero-shot toy-photo {zero_shot_photo(model, test):.1f}%"
            )
            model.train()
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy-clip.safetensors", help="where to write the fp16 weights")
    parser.add_argument("--eval-every", type=int, default=500, help="print zero-shot toy-photo every N steps")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = pretrain(eval_every=args.eval_every)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_clip(model, out, dtype=torch.float16)
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, SHA-256 {sha256(out)}) "
        f"in {(time.perf_counter() - start) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
