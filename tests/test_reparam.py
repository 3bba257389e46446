"""reparam.py: the merge contract, proven alike for R-Adapter, LoRA and SSF (one parametrised test each):
merged == unmerged at any alpha, a plain CLIP when merged, bit-exact unmerge, alpha 0 = zero-shot
CLIP, training refused while merged, the export loaded by open_clip, and the EMA over any method."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_r_adapter import assert_close, assert_equal, batch, configs, features, open_clip_model, random_clip, tiny

import lora
import r_adapter
import reparam
import ssf
from clip_weights import load_clip

FAST = settings(max_examples=10, deadline=None)
ADD = {  # method -> attach(model, rank): its one wrapping rule
    "r-adapter": lambda model, rank: r_adapter.add_adapters(model, rank),
    "lora": lambda model, rank: lora.add_lora(model, rank or 4),
    "ssf": lambda model, rank: ssf.add_ssf(model),
}
ranks = st.one_of(st.none(), st.integers(1, 8))


def trained(method, cfg, rank=None, seed=0):
    """(zero-shot CLIP, a copy with `method` attached and every trainable tensor moved off its init)."""
    base = random_clip(cfg, seed)
    model = ADD[method](copy.deepcopy(base), rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return base, model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ADD)
@FAST
@given(cfg=configs, rank=ranks, alpha=st.floats(0, 1), n=st.integers(1, 3), seed=st.integers(0, 99))
def test_merged_equals_unmerged_at_any_alpha_and_unmerge_is_exact(at_alpha, method, cfg, rank, alpha, n, seed):
    base, model = trained(method, cfg, rank, seed)
    images, tokens = batch(cfg, n, seed)
    before, unmerged = state(model), features(model, images, tokens)
    reference = features(at_alpha(model, alpha), images, tokens)
    assert not torch.allclose(unmerged[0], features(base, images, tokens)[0])  # the method does act

    reparam.merge(model, alpha)
    assert reparam.is_merged(model)
    assert_close(features(model, images, tokens), reference)
    assert not reparam.foldables(model) and not any(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == base.state_dict().keys()  # a plain CLIP: no extra parameters
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())

    reparam.unmerge(model)
    assert not reparam.is_merged(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert_equal(features(model, images, tokens), unmerged)


@pytest.mark.parametrize("method", ADD)
def test_alpha_0_is_the_zero_shot_clip_bit_for_bit(method):
    cfg = tiny(vision_layers=2)
    base, model = trained(method, cfg, rank=3)
    images, tokens = batch(cfg)
    with reparam.merged(model, 0.0):
        merged = model.state_dict()
        assert all(torch.equal(merged[k], v) for k, v in base.state_dict().items())
        assert_equal(features(model, images, tokens), features(base, images, tokens))


@pytest.mark.parametrize("method", ADD)
def test_fresh_method_is_the_zero_shot_clip(method):
    cfg = tiny()
    base = random_clip(cfg)
    model = ADD[method](copy.deepcopy(base), None)
    images, tokens = batch(cfg, 3)
    assert_equal(features(model, images, tokens), features(base, images, tokens))
    assert all(p.requires_grad == (n not in base.state_dict()) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ADD)
def test_export_loads_in_clip_model_and_open_clip(at_alpha, method, tmp_path):
    cfg = tiny(vision_width=128, vision_layers=2, text_layers=2)
    _, model = trained(method, cfg, rank=5)
    path = tmp_path / "merged.safetensors"
    model.train()
    reparam.export_merged(model, path, alpha=0.6)
    assert model.training and not reparam.is_merged(model)
    images, tokens = batch(cfg, 3)
    expected = features(at_alpha(model, 0.6).eval(), images, tokens)
    assert_close(features(load_clip(path), images, tokens), expected)
    ref = open_clip_model(cfg)
    ref.load_state_dict(load_file(path))  # strict: exactly open_clip's keys
    assert_close(features(ref, images, tokens), expected)


@pytest.mark.parametrize("method", ADD)
def test_training_while_merged_is_refused_and_misuse_is_clear(method, tmp_path):
    cfg = tiny()
    _, model = trained(method, cfg)
    ema = reparam.EMA(model, 0.9)
    with pytest.raises(RuntimeError, match="eval"):
        reparam.merge(model.train(), 0.5)
    with pytest.raises(RuntimeError, match="not merged"):
        reparam.unmerge(model)
    reparam.merge(model.eval(), 0.5)
    for action in (lambda: reparam.merge(model, 0.5), lambda: ema.update(model), lambda: reparam.EMA(model)):
        with pytest.raises(RuntimeError, match="merged"):
            action()
    images, tokens = batch(cfg)
    model.train()
    for encode, x in [(model.encode_image, images), (model.encode_text, tokens)]:
        with pytest.raises(RuntimeError, match="evaluation only"):
            encode(x)
    reparam.unmerge(model)
    model(images, tokens)  # training works again
    ema.update(model)
    for other in ADD:  # one method per model: a wrapped layer is not wrapped again
        with pytest.raises((TypeError, RuntimeError), match="plain nn.Linear|already has adapters"):
            ADD[other](model, 2)
    with pytest.raises(RuntimeError, match="no re-parameterisable layers"):
        reparam.merge(random_clip(cfg), 0.5)


def test_merged_context_restores_weights_and_mode_after_an_error():
    cfg = tiny()
    _, model = trained("ssf", cfg)
    before = state(model)
    model.train()
    with pytest.raises(KeyError):
        with reparam.merged(model, 0.3) as merged:
            assert merged is model and reparam.is_merged(model) and not model.training
            raise KeyError
    assert model.training and not reparam.is_merged(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------- EMA
@pytest.mark.parametrize("method", ADD)
@settings(max_examples=8, deadline=None)
@given(m=st.floats(0, 1), k=st.integers(0, 12))
def test_ema_closed_form_over_any_method(method, m, k):
    """After k updates from W0 with the live weights held at W: W~ = m^k W0 + (1 - m^k) W, over
    exactly the parameters that train."""
    base = random_clip(tiny())
    model = ADD[method](copy.deepcopy(base), 2)
    ema = reparam.EMA(model, m)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert ema.W_tilde.keys() == W0.keys() and not set(W0) & set(base.state_dict())
    _, moved = trained(method, tiny(), rank=2, seed=1)
    W = {n: p.detach().clone() for n, p in moved.named_parameters() if p.requires_grad}
    model.load_state_dict(moved.state_dict())
    for _ in range(k):
        ema.update(model)
    for n, w in ema.W_tilde.items():
        torch.testing.assert_close(w, m**k * W0[n] + (1 - m**k) * W[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ADD)
def test_merge_with_ema_folds_the_ema_weights_and_keeps_the_live_ones(method):
    cfg = tiny(vision_layers=2)
    _, model = trained(method, cfg, rank=3)
    ema = reparam.EMA(model, 0.0)  # shadow = the live weights after one update
    ema.update(model)
    twin = copy.deepcopy(model)  # holds the EMA weights as its live ones
    live_before = state(model)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.mul_(0.5)  # the live weights move away from the EMA
    live = state(model)
    images, tokens = batch(cfg)
    with reparam.merged(model, 0.7, ema=ema):
        folded = features(model, images, tokens)
    with reparam.merged(twin, 0.7):
        assert_equal(folded, features(twin, images, tokens))
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())  # live weights restored
    assert not all(torch.equal(v, live_before[k]) for k, v in live.items())
    restored = reparam.EMA(model, 0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.m == 0.0 and all(torch.equal(restored.W_tilde[n], w) for n, w in ema.W_tilde.items())
