"""r_adapter.py: zero init, what trains, adapter dropping, guards, checkpoints, counts (merging: test_reparam.py)."""

import copy

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file

import checkpoints
import r_adapter as ra
import reparam
from clip_model import CLIP, PRESETS, CLIPConfig

FAST = settings(max_examples=12, deadline=None)


def tiny(vision_width=64, vision_layers=1, text_width=64, text_layers=1, image_size=16, context_length=8):
    return CLIPConfig(
        embed_dim=32,
        image_size=image_size,
        patch_size=8,
        vision_width=vision_width,
        vision_layers=vision_layers,
        context_length=context_length,
        vocab_size=1000,
        text_width=text_width,
        text_layers=text_layers,
    )


configs = st.builds(
    tiny,
    vision_width=st.sampled_from([64, 128]),
    vision_layers=st.integers(1, 3),
    text_width=st.sampled_from([64, 128]),
    text_layers=st.integers(1, 2),
    image_size=st.sampled_from([16, 32]),
    context_length=st.sampled_from([8, 16]),
)
ranks = st.one_of(
    st.none(),
    st.integers(1, 8),
    st.fixed_dictionaries(
        {"visual": st.one_of(st.none(), st.integers(1, 8)), "text": st.one_of(st.none(), st.integers(1, 8))}
    ),
)


def random_clip(cfg, seed=0):
    """A CLIP with every tensor random (biases and LayerNorms too), in eval mode."""
    torch.manual_seed(seed)
    model = CLIP(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def randomize_adapters(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ra.adapter_parameters(model):
            p.copy_(
                torch.rand(p.shape, generator=g) * 0.9 + 0.1
                if name.endswith(".s")
                else torch.randn(p.shape, generator=g) * std
            )
    return model


def batch(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(1, cfg.vocab_size, (n, cfg.context_length), generator=g)
    return images, tokens


@torch.no_grad()
def features(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


def assert_close(a, b, rtol=1e-5):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert (x - y).abs().max() <= rtol * y.abs().max(), (x - y).abs().max()


def assert_equal(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def adapted(cfg, rank=None, seed=0, learn_scale=True, **kw):
    base = random_clip(cfg, seed)
    model = randomize_adapters(ra.add_adapters(copy.deepcopy(base), rank, learn_scale=learn_scale, **kw), seed)
    return base, model


@FAST
@given(
    cfg=configs,
    rank=ranks,
    seed=st.integers(0, 99),
    learn_scale=st.booleans(),
    drop_mode=st.sampled_from(ra.DROP_MODES),
)
def test_fresh_adapters_are_zero_shot_clip_exactly(cfg, rank, seed, learn_scale, drop_mode):
    base = random_clip(cfg, seed)
    model = ra.add_adapters(copy.deepcopy(base), rank, drop_mode=drop_mode, learn_scale=learn_scale)
    images, tokens = batch(cfg, 3, seed)
    assert_equal(features(model, images, tokens), features(base, images, tokens))
    assert_equal(features(model.train(), images, tokens), features(base.train(), images, tokens))
    for _, layer in ra._adapted(model):
        a = layer.adapter
        assert (a.s is not None) == learn_scale and (a.s is None or a.s.item() == pytest.approx(0.1))
        if a.rank is None:
            assert not a.W_adp.any()
        else:
            assert not a.B.any() and a.A.abs().min() > 0  # up zero, down random


def test_only_adapters_train_and_base_keys_unchanged():
    cfg = tiny()
    base = random_clip(cfg)
    model = copy.deepcopy(base)
    w_o = model.visual.blocks[0].attn.proj.weight
    ra.add_adapters(model, rank={"visual": None, "text": 4})
    assert model.visual.blocks[0].attn.proj.weight is w_o  # shared, not copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ra.adapter_parameters(model)}
    assert "logit_scale" not in trainable and len(trainable) == 2 * 2 + 2 * 3  # (W_adp, s), (A, B, s)
    assert set(base.state_dict()) <= set(model.state_dict())
    images, tokens = batch(cfg)
    model.train()
    img, txt, scale = model(images, tokens)
    (img @ txt.T * scale).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None for n, p in ra.adapter_parameters(model))


def test_vit_b16_trainable_count():
    for learn_scale, expected in [(True, 20_447_232 + 48), (False, 20_447_232)]:
        with torch.device("meta"):
            model = ra.add_adapters(CLIP(PRESETS["ViT-B-16"]), learn_scale=learn_scale)
        assert 12 * 2 * 768**2 + 12 * 2 * 512**2 == 20_447_232
        assert ra.count_trainable(model) == expected
        assert "W_adp 20,447,232" in ra.summary(model)
    with torch.device("meta"):
        model = ra.add_adapters(CLIP(PRESETS["ViT-B-16"]), rank=8)
    assert ra.count_trainable(model) == 24 * 2 * 8 * 768 + 24 * 2 * 8 * 512 + 48


# ----------------------------------------------------------------- dropping
def identity_adapter(d=8, p=0.2, mode="sample"):
    a = ra.Adapter(d, drop_p=p, drop_mode=mode)
    with torch.no_grad():
        a.W_adp.copy_(torch.eye(d))
        a.s.fill_(1.0)
    return a  # branch = y, so output / input is the drop gain


@settings(max_examples=10, deadline=None)
@given(p=st.floats(0.05, 0.8), mode=st.sampled_from(ra.DROP_MODES), seed=st.integers(0, 99))
def test_dropping_is_unbiased_and_off_in_eval(p, mode, seed):
    torch.manual_seed(seed)
    a = identity_adapter(p=p, mode=mode)
    y = torch.randn(4, 5, 8)
    a.eval()
    assert torch.equal(a(y), y) and torch.equal(a(y), a(y))
    a.train()
    draws = 3000
    mean = sum(a(y) for _ in range(draws)) / draws
    sigma = (p / (1 - p)) ** 0.5 / draws**0.5  # std of the mean gain
    assert ((mean - y).abs() <= 6 * sigma * y.abs()).all()
    gain = a(y) / y
    assert ((gain == 0) | ((gain - 1 / (1 - p)).abs() < 1e-4)).all()


def test_drop_p_0_is_no_dropping():
    a, y = identity_adapter(p=0.0), torch.randn(4, 5, 8)
    assert torch.equal(a.train()(y), a.eval()(y))


@pytest.mark.parametrize("mode", ra.DROP_MODES)
def test_drop_mask_granularity(mode):
    torch.manual_seed(0)
    a = identity_adapter(p=0.5, mode=mode).train()
    gain = a(torch.ones(64, 48, 8))  # [N, L, d], the branch's gain: 0 or 2
    assert torch.equal(gain, gain[..., :1].expand_as(gain))  # features of a token share it
    if mode == "sample":  # one draw per sample: all its tokens share it, samples differ
        assert torch.equal(gain, gain[:, :1].expand_as(gain)) and len(gain[:, 0, 0].unique()) == 2
    else:  # one draw per position, shared by the batch, positions differ
        assert torch.equal(gain, gain[:1].expand_as(gain)) and len(gain[0, :, 0].unique()) == 2


@pytest.mark.parametrize("mode", ra.DROP_MODES)
def test_joint_forward_draws_image_then_text_as_the_release(mode):
    """The released code encodes the image before the text, so under one seed a joint forward's adapter
    draws are those of encode_image followed by encode_text (dropping at p = 0.5, in training mode)."""
    model = ra.add_adapters(random_clip(tiny()), rank=None, drop_p=0.5, drop_mode=mode)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapter" in n:
                p.normal_(std=0.5)  # adapters away from zero, so that a dropped branch changes the output
    model.train()
    images, tokens = torch.randn(4, 3, 16, 16), torch.randint(1, 999, (4, 8))
    torch.manual_seed(7)
    f, g, _ = model(images, tokens)
    torch.manual_seed(7)
    f_alone = model.encode_image(images, normalize=True)
    g_alone = model.encode_text(tokens, normalize=True)
    assert torch.equal(f, f_alone) and torch.equal(g, g_alone)
    torch.manual_seed(7)
    g_first = model.encode_text(tokens, normalize=True)
    assert not torch.equal(g_first, g)  # the order is observable: text first draws other masks


# ---------------------------------------------------------------------- EMA
# -------------------------------------------------------------- checkpoints
def test_save_load_adapters_and_ema_round_trip(tmp_path):
    cfg = tiny(vision_layers=2)
    base, model = adapted(cfg, rank={"visual": 4, "text": None}, drop_p=0.3, drop_mode="token")
    ema = reparam.EMA(model, 0.99)
    randomize_adapters(model, seed=5)
    ema.update(model)
    path = tmp_path / "adapters.safetensors"
    checkpoints.save_adapters(model, path, ema=ema)
    assert set(ema.W_tilde) == set(ra.adapter_state_dict(model))  # the EMA of R-Adapter is over its adapters
    assert set(load_file(path)) == set(ra.adapter_state_dict(model)) | {f"ema.{n}" for n in ema.W_tilde}

    loaded = checkpoints.load_adapters(copy.deepcopy(base), path, use_ema=False)
    assert loaded.r_adapter_config == model.r_adapter_config
    images, tokens = batch(cfg)
    assert_equal(features(loaded, images, tokens), features(model, images, tokens))
    loaded_ema = checkpoints.load_ema(loaded, path)
    assert loaded_ema.m == 0.99 and all(torch.equal(loaded_ema.W_tilde[n], w) for n, w in ema.W_tilde.items())
    from_ema = checkpoints.load_adapters(copy.deepcopy(base), path)  # the EMA weights by default
    with ema.applied(model):
        assert_equal(features(from_ema, images, tokens), features(model, images, tokens))
    checkpoints.save_adapters(model, tmp_path / "live.safetensors")  # no EMA saved: the live weights
    assert_equal(
        features(checkpoints.load_adapters(copy.deepcopy(base), tmp_path / "live.safetensors"), images, tokens),
        features(model, images, tokens),
    )
    with pytest.raises(ValueError, match="no EMA"):
        checkpoints.load_adapters(copy.deepcopy(base), tmp_path / "live.safetensors", use_ema=True)

    other = random_clip(tiny(vision_layers=1))
    with pytest.raises(ValueError, match="adapters.safetensors"):
        checkpoints.load_adapters(other, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        checkpoints.load_adapters(copy.deepcopy(base), tmp_path / "junk.safetensors")


def open_clip_model(cfg):
    return open_clip.model.CLIP(
        cfg.embed_dim,
        CLIPVisionCfg(
            layers=cfg.vision_layers, width=cfg.vision_width, patch_size=cfg.patch_size, image_size=cfg.image_size
        ),
        CLIPTextCfg(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.text_width,
            heads=cfg.text_width // 64,
            layers=cfg.text_layers,
        ),
        quick_gelu=cfg.quick_gelu,
    ).eval()


def test_misuse_is_a_clear_error():
    _, model = adapted(tiny())
    with pytest.raises(RuntimeError, match="already has adapters"):
        ra.add_adapters(model)
    with pytest.raises(ValueError, match="rank"):
        ra.add_adapters(random_clip(tiny()), rank=0)
    with pytest.raises(RuntimeError, match="no adapters"):
        ra.adapter_parameters(random_clip(tiny()))
    reparam.merge(model.eval(), 0.5)
    for action in (ra.add_adapters, ra.adapter_state_dict):
        with pytest.raises(RuntimeError, match="merged"):
            action(model)
