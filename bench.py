"""Speed benchmarks, measured side by side in one run (never in timed tests).

    python bench.py                 # CPU, plus CUDA when a GPU is present
    python bench.py --device cpu --repeats 5

Each section builds the contenders on the same random weights, inputs and dtype,
runs them interleaved (A, B, A, B, ...) after a warm-up, and prints median times
and the ratio against the first contender.
"""
import argparse
import copy
import statistics
import time

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import r_adapter
from clip_model import PRESETS, load_clip, tokenize


def interleaved(contenders, repeats, device):
    """Median seconds of each zero-argument callable, timed in alternation."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in contenders}
    with torch.inference_mode():
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
            c.embed_dim, CLIPVisionCfg(layers=c.vision_layers, width=c.vision_width, patch_size=c.patch_size,
                                       image_size=c.image_size),
            CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                        heads=c.text_width // 64, layers=c.text_layers), quick_gelu=True)
    else:
        ref = open_clip.create_model(f"{preset}-quickgelu", pretrained=None)
    return ref.eval()


def ours_from(ref, path):
    torch.save(ref.state_dict(), path)
    return load_clip(path)


def inputs(preset, batch, device, dtype):
    c = PRESETS[preset]
    images = torch.randn(batch, 3, c.image_size, c.image_size, device=device, dtype=dtype)
    tokens = tokenize([f"a photo of a number {i}, the best one." for i in range(batch)], c.context_length)
    return images, tokens.to(device)


def bench_clip(preset, batch, device, dtype, repeats, tmp):
    """Our encode_image + encode_text against open_clip's, same weights."""
    ref = open_clip_reference(preset)
    ours = ours_from(ref, tmp)
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    images, tokens = inputs(preset, batch, device, dtype)
    medians = interleaved({
        "open_clip": lambda: (ref.encode_image(images), ref.encode_text(tokens)),
        "ours": lambda: (ours.encode_image(images), ours.encode_text(tokens)),
    }, repeats, device)
    report(f"CLIP {preset} b{batch} {device.type} {str(dtype)[6:]}", medians)


def bench_r_adapter(preset, batch, device, dtype, repeats, tmp):
    """Vanilla CLIP vs the adapted CLIP unmerged (eval) vs merged: merging should cost nothing."""
    vanilla = ours_from(open_clip_reference(preset), tmp).to(device, dtype)
    unmerged = r_adapter.add_adapters(copy.deepcopy(vanilla))
    with torch.no_grad():
        for _, p in r_adapter.adapter_parameters(unmerged):
            p.normal_(0, 0.02)
    merged = r_adapter.merge(copy.deepcopy(unmerged).eval())
    images, tokens = inputs(preset, batch, device, dtype)
    medians = interleaved({
        "vanilla": lambda: (vanilla.encode_image(images), vanilla.encode_text(tokens)),
        "unmerged": lambda: (unmerged.encode_image(images), unmerged.encode_text(tokens)),
        "merged": lambda: (merged.encode_image(images), merged.encode_text(tokens)),
    }, repeats, device)
    report(f"R-Adapter {preset} b{batch} {device.type} {str(dtype)[6:]}", medians)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    tmp = "/tmp/bench_clip.pt"
    runs = []
    if args.device in ("cpu", "all"):
        runs += [("tiny", 64, torch.device("cpu"), torch.float32), ("ViT-B-16", 4, torch.device("cpu"), torch.float32)]
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs += [("tiny", 256, cuda, torch.float32), ("ViT-B-16", 128, cuda, torch.float32),
                 ("ViT-B-16", 128, cuda, torch.bfloat16)]
    for preset, batch, device, dtype in runs:
        bench_clip(preset, batch, device, dtype, args.repeats, tmp)
    for preset, batch, device, dtype in runs:
        bench_r_adapter(preset, batch, device, dtype, args.repeats, tmp)


if __name__ == "__main__":
    main()
