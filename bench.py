"""Speed benchmarks, measured side by side in one run (never in timed tests).

    python bench.py                 # inference: CPU, plus CUDA when a GPU is present
    python bench.py --device cpu --repeats 5
    python bench.py --model toy     # merged / unmerged R-Adapter on one CLIP (toy, a file, ViT-B-16, ARCH:TAG)
    python bench.py --train         # the paper's training step on the GPU (ViT-B/16, batch 256)
    python bench.py --train --preset tiny --batch 32 --jpegs 200     # the same on a CPU, small

Each section builds the contenders on the same random weights, inputs and dtype,
runs them interleaved (A, B, A, B, ...) after a warm-up, and prints median times
and the ratio against the first contender.

--train times one training step (forward, MPM-NCE, backward, clipping, AdamW; the EMA update
is left out) of R-Adapter eager and under torch.compile, of the released code's set-up (open_clip
with the same adapters on forward hooks, fp16 autocast + GradScaler), of full fine-tuning, and of
both with gradient checkpointing; FLOPs per image-caption pair (FlopCounterMode), MFU, peak
memory; merged R-Adapter inference against vanilla CLIP; and the input pipeline alone (JPEG
decode + the training crop + normalise) against the step it has to feed.
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import baselines
import cli
import r_adapter
import reparam
from clip_model import CLIP_MEAN, CLIP_STD, PRESETS, image_transform, tokenize
from clip_weights import WeightsError, load_clip
from data import DataError, ImageList, collate_skip
from mpm_nce import mpm_nce_loss


def interleaved(contenders, repeats, device, grad=False):
    """Median seconds of each zero-argument callable, timed in alternation (grad: training steps)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in contenders}
    with nullcontext() if grad else torch.inference_mode():
        for fn in contenders.values():  # warm-up
            fn(), fn()
        for _ in range(repeats):
            for name, fn in contenders.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title, medians):
    base_name, base = next(iter(medians.items()))
    cells = [f"{name} {1e3 * t:8.2f} ms ({t / base:.3f}x)" for name, t in medians.items()]
    print(f"{title:<36} " + " | ".join(cells) + f"   [ratios vs {base_name}]")


def open_clip_reference(preset, seed=0):
    """open_clip model with the preset's shapes and random weights."""
    torch.manual_seed(seed)
    if preset == "tiny":
        c = PRESETS["tiny"]
        ref = open_clip.model.CLIP(
            c.embed_dim,
            CLIPVisionCfg(
                layers=c.vision_layers, width=c.vision_width, patch_size=c.patch_size, image_size=c.image_size
            ),
            CLIPTextCfg(
                context_length=c.context_length,
                vocab_size=c.vocab_size,
                width=c.text_width,
                heads=c.text_width // 64,
                layers=c.text_layers,
            ),
            quick_gelu=True,
        )
    else:
        ref = open_clip.create_model(f"{preset}-quickgelu", pretrained=None)
    return ref.eval()


def ours_from(ref, path):
    torch.save(ref.state_dict(), path)
    return load_clip(path)


def inputs(c, batch, device, dtype):
    """Random images and captions in the shapes of CLIPConfig c."""
    images = torch.randn(batch, 3, c.image_size, c.image_size, device=device, dtype=dtype)
    tokens = tokenize([f"a photo of a number {i}, the best one." for i in range(batch)], c.context_length)
    return images, tokens.to(device)


def bench_clip(preset, batch, device, dtype, repeats, tmp):
    """Our encode_image + encode_text against open_clip's, same weights."""
    ref = open_clip_reference(preset)
    ours = ours_from(ref, tmp)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    images, tokens = inputs(PRESETS[preset], batch, device, dtype)
    medians = interleaved(
        {
            "open_clip": lambda: (ref.encode_image(images), ref.encode_text(tokens)),
            "ours": lambda: (ours.encode_image(images), ours.encode_text(tokens)),
        },
        repeats,
        device,
    )
    report(f"CLIP {preset} b{batch} {device.type} {str(dtype)[6:]}", medians)


def bench_r_adapter(vanilla, name, batch, device, dtype, repeats):
    """Vanilla CLIP vs the adapted CLIP unmerged (eval) vs merged: merging should cost nothing."""
    vanilla = vanilla.to(device, dtype)
    unmerged = r_adapter.add_adapters(copy.deepcopy(vanilla))
    with torch.no_grad():
        for _, p in r_adapter.adapter_parameters(unmerged):
            p.normal_(0, 0.02)
    merged = reparam.merge(copy.deepcopy(unmerged).eval(), alpha=0.5)
    images, tokens = inputs(vanilla.config, batch, device, dtype)
    medians = interleaved(
        {
            "vanilla": lambda: (vanilla.encode_image(images), vanilla.encode_text(tokens)),
            "unmerged": lambda: (unmerged.encode_image(images), unmerged.encode_text(tokens)),
            "merged": lambda: (merged.encode_image(images), merged.encode_text(tokens)),
        },
        repeats,
        device,
    )
    report(f"R-Adapter {name} b{batch} {device.type} {str(dtype)[6:]}", medians)


# ------------------------------------------------------------------ --train
# Dense (no sparsity) bf16/fp16 tensor-core peaks from NVIDIA's data sheets; first match in the device name.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


def peak_flops(device):
    """(peak FLOP/s or None, how it was chosen) for MFU."""
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in PEAK_FLOPS if key in name), None)
    return peak, f"{peak / 1e12:.0f} TFLOP/s, dense bf16 of {name}" if peak else f"n/a: no peak on record for {name}"


def with_hooked_adapters(ref, drop_p=0.2):
    """open_clip's CLIP with R-Adapter's adapters attached as the released code places them: on each
    block's attention output (after W_O) and after mlp.c_proj (W_2), both towers; all else frozen.
    nn.MultiheadAttention applies out_proj inside its functional forward, so that hook sits on the
    attention module, whose output is out_proj's."""
    ref.requires_grad_(False)
    ref.hooked_adapters = nn.ModuleList()
    for tower in (ref.visual.transformer, ref.transformer):
        for block in tower.resblocks:
            a = r_adapter.Adapter(block.attn.embed_dim, drop_p=drop_p)
            b = r_adapter.Adapter(block.mlp.c_proj.out_features, drop_p=drop_p)
            block.attn.register_forward_hook(lambda m, i, o, a=a: (o[0] + a(o[0]), *o[1:]))
            block.mlp.c_proj.register_forward_hook(lambda m, i, o, b=b: o + b(o))
            ref.hooked_adapters.extend([a, b])
    return ref


def train_batch(preset, batch, device):
    c = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, c.image_size, c.image_size, generator=g)
    # captions padded to the context length, as train.py pads them; 100 labels: MPM-NCE's repeated positives
    tokens = tokenize([f"a photo of a number {i}, the best one." for i in range(batch)], c.context_length)
    return images.to(device), tokens.to(device), torch.randint(100, (batch,), generator=g).to(device)


def loss_of(model, images, tokens, labels):
    f, g = model(images, tokens)[:2]  # forward (ours and open_clip's): normalised features first
    return mpm_nce_loss(f, g, labels, tau=0.01, delta=0.05, epsilon=0.02)


def step_fn(model, inputs, amp, scaler):
    """One training step as train.py takes it (forward, MPM-NCE, backward, clip 1.0, AdamW lr 5e-4)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    device = inputs[0].device

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_of(model, *inputs)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flops_per_pair(model, preset, device, n=2):
    """Forward + backward FLOPs per image-caption pair, counted at batch n (linear in the batch up to
    the n x n loss). The math attention kernel is forced so that attention counts on every device
    (FlopCounterMode has no formula for the CPU's fused kernel)."""
    images, tokens, labels = train_batch(preset, n, device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_of(model, images, tokens, labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def bench_train(args, device):
    """The training-step table: each contender built (and its peak memory taken) in turn, then all
    timed interleaved on the same batch."""
    preset, batch, cuda = args.preset, args.batch, device.type == "cuda"
    amp = torch.bfloat16 if cuda else None  # train.py's --precision auto
    compile_ = cuda if args.compile is None else args.compile
    ref = open_clip_reference(preset)
    base = ours_from(ref, args.tmp)
    inputs = train_batch(preset, batch, device)
    peak, peak_note = peak_flops(device)
    setups = {  # name: builds the contender's model (each its own copy of the same random weights)
        "R-Adapter": lambda: r_adapter.add_adapters(copy.deepcopy(base)),
        "R-Adapter, torch.compile": lambda: torch.compile(r_adapter.add_adapters(copy.deepcopy(base))),
        "anchor: open_clip + hooks": lambda: with_hooked_adapters(copy.deepcopy(ref)),
        "full fine-tuning": lambda: baselines.full_finetune(copy.deepcopy(base)),
        "R-Adapter, grad ckpt": lambda: r_adapter.add_adapters(copy.deepcopy(base).set_grad_checkpointing()),
        "full-FT, grad ckpt": lambda: baselines.full_finetune(copy.deepcopy(base).set_grad_checkpointing()),
    }
    flops_of = {
        "R-Adapter, torch.compile": "R-Adapter",
        "R-Adapter, grad ckpt": "R-Adapter",
        "full-FT, grad ckpt": "full fine-tuning",
    }  # MFU counts model FLOPs, not recomputation
    steps, flops, mem, skipped = {}, {}, {}, {}
    for name, build in setups.items():
        if "compile" in name and not compile_:
            skipped[name] = "skipped on CPU by default (the C++ build would dominate the run); --compile runs it"
            continue
        anchor = name.startswith("anchor")
        before = torch.cuda.memory_allocated(device) if cuda else 0
        model = build().to(device).train()
        if name not in flops_of:
            flops[name] = flops_per_pair(model, preset, device)
        # the released code trains in fp16 with a GradScaler; ours in bf16 (train.py's default on CUDA)
        dtype, scaler = (torch.float16, torch.amp.GradScaler("cuda")) if anchor and cuda else (amp, None)
        steps[name] = step_fn(model, inputs, dtype, scaler)
        for _ in range(2):  # AdamW state, compilation
            steps[name]()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            steps[name]()
            torch.cuda.synchronize(device)
            # its weights, gradients, AdamW state and activations (earlier contenders' memory excluded)
            mem[name] = torch.cuda.max_memory_allocated(device) - before
    flops.update({name: flops[src] for name, src in flops_of.items() if name in steps})
    medians = interleaved(steps, args.repeats, device, grad=True)

    precision = "bf16 autocast (anchor: fp16 autocast + GradScaler)" if cuda else "fp32"
    print(
        f"\nTraining step: {preset}, batch {batch}, {device.type} {precision}, median of {args.repeats}, "
        f"interleaved. MFU peak: {peak_note}."
    )
    print(
        f"{'contender':<28} {'ms/step':>9} {'pairs/s':>9} {'GFLOP/pair':>11} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}"
    )
    for name in setups:
        if name in skipped:
            print(f"{name:<28} {skipped[name]}")
            continue
        t = medians[name]
        rate = flops[name] * batch / t
        mfu = f"{rate / peak:6.1%}" if peak else "   n/a"
        gib = f"{mem[name] / 2**30:9.2f}" if name in mem else "      n/a"
        print(f"{name:<28} {1e3 * t:9.2f} {batch / t:9.1f} {flops[name] / 1e9:11.4g} {rate / 1e12:8.3f} {mfu} {gib}")

    def ratio(a, b, what=medians):
        return f"{what[a] / what[b]:.3f}" if a in what and b in what else "n/a"

    best = min((n for n in ("R-Adapter", "R-Adapter, torch.compile") if n in medians), key=medians.get)
    print(
        f"ours / anchor, step time: {ratio('R-Adapter', 'anchor: open_clip + hooks')} eager"
        + (f", {ratio('R-Adapter, torch.compile', 'anchor: open_clip + hooks')} compiled" if compile_ else "")
    )
    print(
        f"R-Adapter / full fine-tuning: step time {ratio('R-Adapter', 'full fine-tuning')}, "
        f"peak memory {ratio('R-Adapter', 'full fine-tuning', mem)}"
    )
    for ckpt, plain in (("R-Adapter, grad ckpt", "R-Adapter"), ("full-FT, grad ckpt", "full fine-tuning")):
        print(f"{ckpt} / without: step time {ratio(ckpt, plain)}, peak memory {ratio(ckpt, plain, mem)}")
    return batch / medians[best], best


def synthetic_jpegs(root, n, classes=10, size=(500, 375), quality=90, seed=0):
    """n JPEGs in root/<class>/ (ImageNet's typical 500 x 375): smooth random colour fields plus
    grain, so they compress like photographs rather than like noise."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        path = Path(root) / f"c{i % classes}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=quality)
        samples.append((str(path), i % classes))
    return samples


def pil_loader_rate(samples, size, batch, workers):
    """Images/s of the training input path: DataLoader over data.ImageList with the training transform
    (decode, RandomResizedCrop(size, scale 0.9-1, bicubic), normalise), timed after the first batch."""
    loader = DataLoader(
        ImageList(samples, image_transform(size, train=True)),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_skip,
    )
    batches = iter(loader)
    next(batches)  # workers started
    start, n = time.perf_counter(), 0
    for images, _, _ in batches:
        n += len(images)
    return n / (time.perf_counter() - start)


def gpu_decode_rate(samples, size, batch, device):
    """Images/s of batched nvJPEG decoding (torchvision.io.decode_jpeg on the GPU), the same crop
    (bicubic, antialiased) and normalisation on the GPU; files are read on the CPU, in this thread."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    from torchvision.transforms.v2.functional import resized_crop

    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1) * 255

    def run(chunk):
        data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p, _ in chunk]
        crops = []
        for image in decode_jpeg(data, device=device):
            top, left, h, w = RandomResizedCrop.get_params(image, (0.9, 1.0), (3 / 4, 4 / 3))
            crops.append(resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True))
        return (torch.stack(crops).float() - mean) / std

    run(samples[:batch])  # nvJPEG initialisation
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(samples), batch):
        run(samples[i : i + batch])
    torch.cuda.synchronize(device)
    return len(samples) / (time.perf_counter() - start)


def bench_pipeline(args, device, step_rate, step_name):
    size = PRESETS[args.preset].image_size
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        samples = synthetic_jpegs(root, args.jpegs)
        mb = sum(os.path.getsize(p) for p, _ in samples) / 2**20
        print(
            f"\nInput pipeline: {len(samples)} synthetic JPEGs, 500x375, quality 90, "
            f"{mb / len(samples) * 1024:.0f} KiB each (written in {time.perf_counter() - start:.1f} s); "
            f"decode + RandomResizedCrop({size}, scale 0.9-1, bicubic) + normalise, batch {args.batch}"
        )
        pil = f"PIL, DataLoader with {args.workers} workers"
        rates = {pil: pil_loader_rate(samples, size, args.batch, args.workers)}
        if device.type == "cuda":
            rates["nvJPEG, decode_jpeg(device='cuda') batched"] = gpu_decode_rate(samples, size, args.batch, device)
    for name, rate in rates.items():
        verdict = "keeps up with" if rate >= step_rate else f"is {step_rate / rate:.1f}x too slow for"
        print(f"{name:<44} {rate:9.1f} images/s: {verdict} the {step_name} step ({step_rate:.1f} pairs/s)")
    if device.type == "cpu":
        print("(on a CPU the loader and the step share the cores; measured one at a time here)")


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = "cpu, cuda, or all: both when a GPU is present (--train, --model: cuda if present, else cpu)"
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help=where)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each contender; the median is shown")
    parser.add_argument("--model", help="time R-Adapter on this CLIP (toy, a file, ViT-B-16, ARCH:TAG), not on presets")
    parser.add_argument("--train", action="store_true", help="the training-step table and the input pipeline")
    parser.add_argument("--preset", choices=list(PRESETS), help="--train: default ViT-B-16 on CUDA, tiny on CPU")
    parser.add_argument("--batch", type=int, help="--train: default 256 on CUDA, 32 on CPU; --model: 128, 4")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="--train: default on for CUDA only")
    parser.add_argument("--jpegs", type=int, default=2000, help="--train: synthetic JPEGs for the input pipeline")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count()), help="--train: DataLoader workers")
    args = parser.parse_args(argv)
    cli.at_least(parser, ("--repeats", args.repeats, 1), ("--batch", args.batch, 1), ("--jpegs", args.jpegs, 1))
    cli.at_least(parser, ("--workers", args.workers, 0))
    if args.model and args.train:
        parser.error(f"--model {args.model}: --train times the --preset shapes against open_clip, not a given CLIP")
    args.tmp = "/tmp/bench_clip.pt"
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    cuda = device.type == "cuda"
    if args.model:
        try:
            model = load_clip(args.model)
        except (DataError, WeightsError, OSError) as e:
            sys.exit(f"error: {e}")
        dtype = torch.bfloat16 if cuda else torch.float32
        with torch.no_grad():
            return bench_r_adapter(model, args.model, args.batch or (128 if cuda else 4), device, dtype, args.repeats)
    if args.train:
        args.preset = args.preset or ("ViT-B-16" if cuda else "tiny")
        args.batch = args.batch or (256 if cuda else 32)
        step_rate, step_name = bench_train(args, device)
        torch.set_grad_enabled(False)
        print()
        vanilla = ours_from(open_clip_reference(args.preset), args.tmp)
        dtype = torch.bfloat16 if cuda else torch.float32
        bench_r_adapter(vanilla, args.preset, args.batch, device, dtype, args.repeats)
        bench_pipeline(args, device, step_rate, step_name)
        return
    torch.set_grad_enabled(False)
    runs = []
    if args.device in ("cpu", "all"):
        runs += [("tiny", 64, torch.device("cpu"), torch.float32), ("ViT-B-16", 4, torch.device("cpu"), torch.float32)]
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs += [
            ("tiny", 256, cuda, torch.float32),
            ("ViT-B-16", 128, cuda, torch.float32),
            ("ViT-B-16", 128, cuda, torch.bfloat16),
        ]
    for preset, batch, device, dtype in runs:
        bench_clip(preset, batch, device, dtype, args.repeats, args.tmp)
    for preset, batch, device, dtype in runs:
        vanilla = ours_from(open_clip_reference(preset), args.tmp)
        bench_r_adapter(vanilla, preset, batch, device, dtype, args.repeats)


if __name__ == "__main__":
    main()
