"""The toy CLIP: pretrained once on the toy world's web, as OpenAI's CLIP was on the real one (docs/toy.md).

The paper fine-tunes CLIP weights pretrained elsewhere (OpenAI's, on 400M web pairs). The toy jobs do the
same with the `toy` preset: `pretrain` trains it on toy_world's web corpus at 32 px, `pretrain_scenes`
continues it at 64 px on web scenes whose captions name every shape (as CLIP's ViT-L/14@336px ends with an
epoch at a higher resolution), and the result ships as assets/toy-clip.safetensors (fp16), which `--model
toy` loads after checking its SHA-256 (clip_weights.load_toy_clip), as a downloaded checkpoint would be
checked. Pretraining is CLIP's (Radford et al., ICML 2021, Sec. 2.5) in miniature: symmetric InfoNCE with
the learned logit scale clamped at 100, AdamW with linear warm-up and cosine decay, and no weight decay on
gains, biases, the class token and the logit scale (as open_clip does). Seeded: a rerun with the same torch
build and thread count gives the same weights.

    OMP_NUM_THREADS=1 python toy_clip.py --out PATH                  # rebuild (1 h on 1 CPU core), print its digest
    OMP_NUM_THREADS=1 python toy_clip.py --stage1 FILE --out PATH    # the 64 px stage only, from stage-1 weights
    python toy_clip.py --web-scenes PNG                              # draw 12 web scenes with their captions
    python train.py --model PATH                                     # fine-tune a rebuilt one
"""

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import plots
from clip_model import CLIP, CLIP_MEAN, CLIP_STD, PRESETS, tokenize
from clip_weights import load_clip, save_clip, sha256
from data import toy_scenes, toy_world
from mpm_nce import infonce_loss

TOY_PRETRAIN = dict(pairs=200_000, steps=4500, batch_size=256, lr=1e-3, warmup=100, weight_decay=0.1, seed=0)


# ------------------------------------------------------------------ pretraining the toy CLIP
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


def adamw(model, p):
    """AdamW at p['lr'] with p['weight_decay'], none on gains, biases, the class token and the logit scale."""
    no_decay = {n for n, q in model.named_parameters() if q.ndim < 2 or n == "visual.cls_token"}
    groups = [[q for n, q in model.named_parameters() if (n in no_decay) == skip] for skip in (False, True)]
    return torch.optim.AdamW(
        [{"params": groups[0], "weight_decay": p["weight_decay"]}, {"params": groups[1], "weight_decay": 0.0}],
        lr=p["lr"],
    )


def clip_step(model, optimizer, images, tokens):
    """One step of CLIP's objective on a batch of pairs: symmetric InfoNCE at the learned temperature
    tau = 1 / logit_scale, which is then clamped at 100 (Radford et al. 2021, Sec. 2.5). Returns the loss."""
    f, g, s = model(images, tokens)
    loss = infonce_loss(f, g, tau=1 / s)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss


def pretrain(p=TOY_PRETRAIN, eval_every=500, snapshot=None):
    """The toy CLIP, pretrained on p['pairs'] web pairs for p['steps'] steps; seeded, so a rerun with
    the same torch build and thread count gives the same weights. snapshot(model, step), if given, is
    called every eval_every steps."""
    torch.manual_seed(p["seed"])
    model = CLIP(PRESETS["toy"]).train()
    web = toy_world.WebCorpus(p["pairs"], seed=p["seed"])
    images, tokens = normalise(web.images), tokenize(web.captions, model.config.context_length)  # [n,3,32,32], [n,L]
    test = toy_world.ToySplit("photo", 250, split="test") if eval_every else None
    optimizer = adamw(model, p)
    order = torch.randperm(len(images))
    for step in tqdm(range(p["steps"]), desc="pretraining the toy CLIP", mininterval=10):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, p)
        idx = order[torch.arange(step * p["batch_size"], (step + 1) * p["batch_size"]) % len(order)]
        loss = clip_step(model, optimizer, images[idx], tokens[idx])
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            tqdm.write(
                f"step {step + 1}: InfoNCE {loss.item():.3f}, zero-shot toy-photo {zero_shot_photo(model, test):.1f}%"
            )
            if snapshot:
                snapshot(model, step + 1)
            model.train()
    return model.eval()


# The second stage: as CLIP's ViT-L/14@336px ends with one more epoch at a higher resolution (Radford et
# al. 2021, Sec. 2.5), the toy CLIP ends at the scenes' 64 px, on web images that hold several objects:
# batches of stage-1 web pairs (32 px) alternate with batches of web scenes (toy_scenes.WebScenes), whose
# captions name every shape, so that each patch token learns what it shows, as real CLIP's do.
TOY_SCENE_STAGE = dict(scenes=20_000, steps=600, batch_size=256, scene_batch=128, lr=1e-4, warmup=50, seed=0)


def pretrain_scenes(model, p=TOY_SCENE_STAGE, stage1=TOY_PRETRAIN):
    """The second stage, from `model` (stage 1's weights as shipped in fp16): stage 1's AdamW and weight
    decay, linear warm-up and cosine decay to 0; even steps draw web pairs, odd steps web scenes. Seeded."""
    model = model.half().float().train()  # [fp16 rounding] the stage-1 weights as a file holds them
    web, scenes = toy_world.WebCorpus(stage1["pairs"], seed=stage1["seed"]), toy_scenes.WebScenes(p["scenes"])
    L = model.config.context_length
    batches = [  # (images [n, 3, 32, 32] or [n, 3, 64, 64], tokens [n, L], batch size)
        (normalise(web.images), tokenize(web.captions, L), p["batch_size"]),
        (normalise(scenes.images), tokenize(scenes.captions, L), p["scene_batch"]),
    ]
    optimizer = adamw(model, dict(p, weight_decay=stage1["weight_decay"]))
    generator = torch.Generator().manual_seed(p["seed"])
    for step in tqdm(range(p["steps"]), desc="pretraining the toy CLIP at 64 px", mininterval=10):
        for group in optimizer.param_groups:
            group["lr"] = p["lr"] * min(1, (step + 1) / p["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / p["steps"]))
        images, tokens, n = batches[step % 2]
        idx = torch.randint(len(images), (n,), generator=generator)
        loss = clip_step(model, optimizer, images[idx], tokens[idx])
        if (step + 1) % 100 == 0:
            tqdm.write(f"64 px step {step + 1}: InfoNCE {loss.item():.3f}")
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy-clip.safetensors", help="where to write the fp16 weights")
    parser.add_argument("--eval-every", type=int, default=500, help="print zero-shot toy-photo every N steps")
    parser.add_argument("--snapshots", action="store_true", help="also save the weights every --eval-every steps")
    parser.add_argument("--stage1", metavar="PATH", help="run the 64 px stage only, from these stage-1 weights")
    parser.add_argument("--web-scenes", metavar="PNG", help="instead: draw 12 web scenes of the 64 px stage")
    args = parser.parse_args(argv)
    if args.web_scenes:
        web = toy_scenes.WebScenes(12)
        return plots.plot_captioned(web.images.permute(0, 2, 3, 1).numpy(), web.captions, args.web_scenes)
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def snapshot(model, step):
        save_clip(model, out.with_name(f"{out.stem}.step{step}.safetensors"), dtype=torch.float16)

    if args.stage1:
        model = load_clip(args.stage1, config="toy")
    else:
        model = pretrain(eval_every=args.eval_every, snapshot=snapshot if args.snapshots else None)
        save_clip(model, out.with_name(f"{out.stem}.stage1.safetensors"), dtype=torch.float16)
    model = pretrain_scenes(model)
    save_clip(model, out, dtype=torch.float16)
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, SHA-256 {sha256(out)}) "
        f"in {(time.perf_counter() - start) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
