"""On a CUDA device: low-precision merging, fp16/bf16 training steps, torch.compile, resume.

Skipped without a GPU; `python -m pytest -q -m cuda` runs only these. Tolerances are stated at each
assertion. Not yet run on a GPU: the merge bounds come from the same computation in bf16/fp16 on a
CPU (max errors 2.0e-3 and 2.5e-4), with room for cuBLAS, whose fp16/bf16 GEMMs may reduce in
lower precision (on by default).
"""

import copy

import pytest
import torch
from safetensors.torch import load_file

import r_adapter
import reparam
import train
from clip_model import CLIP, PRESETS, tokenize

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICE = "cuda"  # (train.main picks the GPU by itself)

# max |merged - unmerged| over L2-normalised features (entries ~0.04 for 512-d features), ViT-B/16 shapes
MERGE_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def adapted_clip(preset, device, seed=0, std=0.02):
    """A random CLIP with random adapters (so merging has something to fold), eval mode."""
    torch.manual_seed(seed)
    model = r_adapter.add_adapters(CLIP(PRESETS[preset]), drop_p=0.2)
    with torch.no_grad():
        for name, p in r_adapter.adapter_parameters(model):
            if name.endswith(".W_adp"):
                p.normal_(0, std)
    return model.to(device).eval()


def inputs(preset, n, device, seed=1):
    c = PRESETS[preset]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, c.image_size, c.image_size, generator=g)
    tokens = tokenize([f"a photo of a number {i}." for i in range(n)], c.context_length)
    return images.to(device), tokens.to(device)


@torch.no_grad()
def features(model, images, tokens):
    return torch.cat([model.encode_image(images, True), model.encode_text(tokens, True)])


def merge_error(at_alpha, dtype, device, preset="ViT-B-16", alpha=0.5):
    """max |merged - unmerged (re-scaled)| of the normalised features with the weights in dtype; the
    merge itself folds in fp32 and casts once (reparam.merge)."""
    model = adapted_clip(preset, device).to(dtype)
    images, tokens = inputs(preset, 4, device)
    images = images.to(dtype)
    unmerged = features(at_alpha(model, alpha), images, tokens).float()
    with reparam.merged(model, alpha):
        merged = features(model, images, tokens).float()
    return (merged - unmerged).abs().max().item(), unmerged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_matches_unmerged_in_low_precision(at_alpha, dtype):
    err, unmerged = merge_error(at_alpha, dtype, DEVICE)
    assert torch.isfinite(unmerged).all()
    assert err <= MERGE_TOL[dtype], err


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_steps(train_args, tmp_path, precision):
    """train.py's steps under autocast (fp16 with its GradScaler): finite, and the adapters moved. Three
    steps, since a GradScaler skips the steps whose fp16 gradients overflow while it backs off from
    its initial scale 2^16 (on a CPU, the fp16 anchor in bench.py skipped two of its first three)."""
    train.main(
        train_args(tmp_path, "--epochs", "1", "--max-steps", "3", "--method", "r-adapter", "--precision", precision)
    )
    ckpt = torch.load(tmp_path / "r-adapter" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3
    w = {n: v for n, v in ckpt["trainable"].items() if n.endswith(".W_adp")}
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in w.values())  # zero-initialised, stepped
    if precision == "fp16":
        assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0
    else:
        assert not ckpt["scaler"]


def test_compile_with_adapters_and_after_unmerge():
    """Compiled = eager: training forward/backward (no dropping, so both see the same function),
    the merged eval model, and the unmerged model again (merge/unmerge swap modules: the compiled
    code must not keep running a stale graph). Through forward(): a compiled module's other methods
    (encode_image, ...) run eagerly."""
    model = adapted_clip("tiny", DEVICE)
    for a in [m.adapter for _, m in r_adapter._adapted(model)]:
        a.drop_p = 0.0
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    images, tokens = inputs("tiny", 8, DEVICE)

    def train_step(m):
        f, g, _ = m.train()(images, tokens)
        (f @ g.T).logsumexp(-1).mean().backward()
        return torch.cat([f, g]).detach()

    @torch.no_grad()
    def evaluate(m):
        return torch.cat(m.eval()(images, tokens)[:2])

    out, ref = train_step(compiled), train_step(twin)  # fp32: TF32 is off by default for matmuls
    assert (out - ref).abs().max() <= 1e-4
    grads = dict(r_adapter.adapter_parameters(model))
    for name, p in r_adapter.adapter_parameters(twin):
        assert (grads[name].grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-8, name

    unmerged = evaluate(compiled)
    assert (unmerged - evaluate(twin)).abs().max() <= 1e-4
    with reparam.merged(model, 0.5), reparam.merged(twin, 0.5):
        merged = evaluate(compiled)
        assert (merged - evaluate(twin)).abs().max() <= 1e-4
    assert (merged - unmerged).abs().max() > 1e-3  # so a stale graph would be seen
    assert (evaluate(compiled) - unmerged).abs().max() <= 1e-6 and not reparam.is_merged(model)


def test_resume_matches_an_uninterrupted_run(train_args, tmp_path, optimizer_steps, capsys):
    """Stopped at step 5 of 12 (--max-steps writes the checkpoint), resumed (bf16, train.py's default on
    CUDA): the final adapters equal the uninterrupted run's within 10% of one AdamW step (about lr =
    5e-4 per weight). The fused attention backward accumulates with atomics, so runs need not be
    bit-identical on a GPU; a resume that lost the optimiser state or the schedule is off by O(lr)."""
    common = ("--epochs", "3", "--method", "r-adapter", "--save-every", "1")
    train.main(train_args(tmp_path / "straight", *common))
    train.main(train_args(tmp_path / "stopped", *common, "--max-steps", "5"))
    assert torch.load(tmp_path / "stopped" / "r-adapter" / "checkpoint.pt", weights_only=True)["step"] == 5
    optimizer_steps.clear()
    capsys.readouterr()
    train.main(train_args(tmp_path / "stopped", *common, "--resume", "latest"))
    assert "at step 5/12" in capsys.readouterr().out and len(optimizer_steps) == 7  # resumed, not restarted
    a = load_file(str(tmp_path / "straight" / "r-adapter" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "r-adapter" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 0.1 * 5e-4, worst
