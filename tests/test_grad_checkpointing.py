"""CLIP.set_grad_checkpointing: the same loss and gradients, far less kept by autograd."""

import pytest
import torch

import baselines
import r_adapter
import train
from clip_model import CLIP, PRESETS, tokenize
from mpm_nce import mpm_nce_loss

CFG = PRESETS["tiny"]


def model_for(method):
    """Tiny CLIP, every weight random; r-adapter: adapters random too, dropping p = 0.5 (so the masks
    matter: checkpointing must recompute each block with the RNG state of its first run)."""
    torch.manual_seed(0)
    model = CLIP(CFG)
    if method == "r-adapter":
        r_adapter.add_adapters(model, drop_p=0.5)
    else:
        baselines.full_finetune(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, CFG.image_size, CFG.image_size, generator=g)
    tokens = tokenize([f"a photo of a number {i}." for i in range(n)], CFG.context_length)
    return images, tokens, torch.arange(n) % 3  # repeated labels: MPM-NCE's multi-positive case


def loss_and_grads(model, checkpointing, seed=0):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    images, tokens, labels = batch()
    torch.manual_seed(seed)  # the adapter-dropping masks
    f, g, _ = model(images, tokens)
    loss = mpm_nce_loss(f, g, labels, tau=0.07, delta=0.05, epsilon=0.02)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_close(a, b):  # fp32: relative to the tensor's largest entry
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("method", ["r-adapter", "full-ft"])
def test_same_loss_and_gradients(method):
    model = model_for(method)
    loss, grads = loss_and_grads(model, False)
    loss_ckpt, grads_ckpt = loss_and_grads(model, True)
    assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads_ckpt[name], grads[name])
    if method == "r-adapter":  # the comparison can see the masks: another seed draws others
        other, _ = loss_and_grads(model, True, seed=1)
        assert not torch.allclose(other, loss)


def saved_bytes(model, encode, inputs):
    """Bytes of the tensors autograd keeps for backward (parameters excluded: they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encode(inputs).sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_each_tower_keeps_only_block_inputs(tower):
    model = model_for("r-adapter")
    images, tokens, _ = batch()
    encode, inputs = (model.encode_image, images) if tower == "visual" else (model.encode_text, tokens)
    plain = saved_bytes(model.set_grad_checkpointing(False), encode, inputs)
    ckpt = saved_bytes(model.set_grad_checkpointing(True), encode, inputs)
    assert ckpt < plain / 4, (ckpt, plain)


def test_train_flag_turns_it_on(train_args, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(CLIP, "set_grad_checkpointing", lambda self, enable=True: calls.append(enable) or self)
    train.main(
        train_args(tmp_path, "--epochs", "1", "--max-steps", "1", "--method", "r-adapter", "--grad-checkpointing")
    )
    assert calls == [True]
