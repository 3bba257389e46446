"""segment.py: CAT-Seg's shapes, its cost volume, the class-order equivariance of class aggregation, the
shifted-window mask, the loss, the sliding window, CAT-Seg's W_q/W_v tuning (W_k never moves), and the
merged R-Adapter inside the segmenter."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lora
import r_adapter
import reparam
import segment
from clip_model import CLIP, PRESETS
from clip_weights import to_openai_state_dict

TINY = PRESETS["tiny"]


def tiny_segmenter(templates=2, seed=0):
    torch.manual_seed(seed)
    return segment.CATSeg(CLIP(TINY), templates, segment.SMALL)


def text(C=5, P=2, e=TINY.embed_dim, seed=1):
    return torch.randn(C, P, e, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_the_guidance_blocks():
    model = tiny_segmenter()
    images = torch.randn(2, 3, 64, 64)  # 8 x 8 patches of 8 px
    assert model(images, text()).shape == (2, 5, 32, 32)  # 1/4 of the input
    tokens = segment.class_tokens(["cat", "sofa, couch, lounge"], ["a {}.", "a photo of the {}."], 20)
    assert tokens.shape == (2, 2, 20)
    assert torch.equal(tokens[1], segment.class_tokens(["sofa"], ["a {}.", "a photo of the {}."], 20)[0])
    assert model(images, tokens).shape == (2, 2, 32, 32)  # tokens are embedded in the forward pass
    assert model.blocks == (0, 1)  # tiny has 4 blocks; ViT-B/16's 12 give CAT-Seg's (3, 7)
    with torch.device("meta"):
        assert segment.CATSeg(CLIP(PRESETS["ViT-B-16"]), 1).blocks == (3, 7)


def test_cost_volume_is_an_explicit_loop():
    dense, E = torch.randn(2, 16, 3, 4), text(C=3, P=2, e=16)
    cost = segment.cost_volume(dense, E)
    assert cost.shape == (2, 3, 2, 3, 4)
    for b in range(2):
        for c in range(3):
            for p in range(2):
                for i in range(3):
                    for j in range(4):
                        expected = F.cosine_similarity(dense[b, :, i, j], E[c, p], dim=0)
                        torch.testing.assert_close(cost[b, c, p, i, j], expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 7), st.sampled_from([1, 2]), st.booleans(), st.randoms(use_true_random=False))
def test_class_aggregation_is_equivariant_to_the_class_order(C, pool, training, rnd):
    torch.manual_seed(rnd.randrange(2**31))
    block = segment.ClassBlock(dim=16, guidance=8, heads=2, pool=pool).train(training)
    x, guidance = torch.randn(2, C, 4, 4, 16), torch.randn(C, 8)
    perm = torch.tensor(rnd.sample(range(C), C))
    torch.testing.assert_close(block(x[:, perm], guidance[perm]), block(x, guidance)[:, perm], rtol=1e-5, atol=1e-5)


def test_the_whole_segmenter_is_equivariant_to_the_class_order():
    model, images, E = tiny_segmenter().eval(), torch.randn(1, 3, 64, 64), text(C=6)
    perm = torch.randperm(6)
    with torch.no_grad():
        torch.testing.assert_close(model(images, E[perm]), model(images, E)[:, perm], rtol=1e-4, atol=1e-5)


def test_shift_mask_lets_only_unwrapped_neighbours_attend():
    """After a cyclic shift by s, two tokens of a window may attend iff neither axis wrapped between them."""
    h, w, window, shift = 8, 12, 4, 2
    mask = segment._shift_mask(h, w, window, shift, "cpu")  # [windows, T, T]
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    wrapped = torch.stack([i >= h - shift, j >= w - shift], -1).float()[None]  # [1, h, w, 2]
    from timm.models.swin_transformer import window_partition

    wrapped = window_partition(wrapped, (window, window)).flatten(1, 2)  # [windows, T, 2]
    expected = (wrapped[:, :, None] == wrapped[:, None, :]).all(-1)
    assert torch.equal(mask, expected) and not mask.all()


def test_spatial_block_with_one_window_is_global_attention_per_class():
    torch.manual_seed(0)
    block = segment.SpatialBlock(dim=16, guidance=8, heads=2, shifted=True)
    x, g = torch.randn(1, 3, 4, 4, 16), torch.randn(1, 4, 4, 8)
    y = block.norm1(x)
    q, k, v = block.q(y) + block.q_guide(g)[:, None], block.k(y) + block.k_guide(g)[:, None], block.v(y)
    q, k, v = (t.flatten(2, 3).unflatten(-1, (2, 8)).transpose(2, 3) for t in (q, k, v))  # [1, C, heads, 16, 8]
    attended = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).flatten(-2).unflatten(2, (4, 4))
    expected = x + block.proj(attended)
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(block(x, g, window=4), expected, rtol=1e-5, atol=1e-5)  # window = grid: no shift


def test_bce_loss_counts_unlabelled_pixels_as_negatives():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, 0, :4] = -1  # IGNORE
    labels[1, 2, :2] = 7  # not a class
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    target = torch.zeros(2, 3, 8, 8)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                if 0 <= labels[b, i, j] < 3:
                    target[b, labels[b, i, j], i, j] = 1
    expected = -(target * F.logsigmoid(up) + (1 - target) * F.logsigmoid(-up)).mean()
    torch.testing.assert_close(segment.bce_loss(logits, labels), expected)


class ChannelModel(torch.nn.Module):
    """Stands in for CATSeg: every class's logit at a pixel is the image's first channel there (1/4 size)."""

    def forward(self, images, text):
        return F.avg_pool2d(images[:, :1], 4).expand(-1, len(text), -1, -1)


def test_sliding_window_averages_crops_and_the_whole_image():
    image = torch.full((3, 50, 70), 0.3)
    probs = segment.sliding_window(ChannelModel(), image, text(C=4), window=32, size=48)
    assert probs.shape == (4, 50, 70)
    torch.testing.assert_close(probs, torch.full_like(probs, torch.tensor(0.3).sigmoid().item()))
    ramp = torch.linspace(-2, 2, 70).expand(3, 50, 70)  # left to right: crops and whole image agree up to resizing
    probs = segment.sliding_window(ChannelModel(), ramp, text(C=1), window=32, size=48)[0]
    assert (probs[:, 1:] >= probs[:, :-1] - 1e-4).all() and probs[0, 0] < 0.3 and probs[0, -1] > 0.7


# ------------------------------------------------------------ CLIP tuning
def qkv_rows(model, tower, block):
    """(W_q, W_k, W_v, bias) of one attention block, from the model's state dict (fused qkv)."""
    state = model.state_dict()
    prefix = f"{tower}.blocks.{block}.attn.qkv."
    return (*state[prefix + "weight"].chunk(3), state[prefix + "bias"])


def test_catseg_tuning_trains_w_q_and_w_v_and_never_moves_w_k():
    torch.manual_seed(0)
    model = CLIP(TINY)
    before = {(t, b): qkv_rows(model, t, b) for t, n in (("visual", 4), ("text", 2)) for b in range(n)}
    plain_keys = set(model.state_dict())
    segment.tune_qv(model)
    assert set(model.state_dict()) == plain_keys  # the fused qkv keys, as in a plain CLIP
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.blocks.{b}.attn.qkv.{w}" for t, b in before for w in ("W_q", "W_v")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 20))
        f, g, _ = model(images, tokens)
        (f * g).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for (t, b), (q0, k0, v0, bias0) in before.items():
        q, k, v, bias = qkv_rows(model, t, b)
        assert torch.equal(k, k0) and torch.equal(bias, bias0), (t, b)  # not even weight decay moved W_k
        assert not torch.equal(q, q0) and not torch.equal(v, v0), (t, b)


def test_split_qkv_computes_the_plain_clip_and_round_trips_its_state_dict():
    torch.manual_seed(0)
    plain = CLIP(TINY).eval()
    split = segment.tune_qv(CLIP(TINY)).eval()
    split.load_state_dict(plain.state_dict())  # fused keys load into the split layers
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 20))
    with torch.no_grad():
        for a, b in zip(plain(images, tokens), split(images, tokens)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours, theirs = to_openai_state_dict(split), to_openai_state_dict(plain)  # open_clip's names and tensors
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_vit_b16_catseg_counts():
    with torch.device("meta"):
        clip = CLIP(PRESETS["ViT-B-16"])
        model = segment.CATSeg(clip, 1)
    head = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in clip.parameters())
    segment.tune_qv(clip)
    assert sum(p.numel() for p in clip.parameters() if p.requires_grad) == 12 * 2 * 768**2 + 12 * 2 * 512**2
    assert 12 * 2 * 768**2 + 12 * 2 * 512**2 == 20_447_232
    assert head == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("clip."))


# ------------------------------------------------------------ R-Adapter and LoRA in the segmenter
def test_merged_r_adapter_equals_unmerged_inside_the_segmenter(at_alpha):
    """The segmenter with its CLIP merged at alpha (the EMA adapters) computes what it computes on an
    unmerged CLIP whose EMA adapter updates are scaled by alpha (conftest.at_alpha)."""
    model = tiny_segmenter()
    r_adapter.add_adapters(model.clip)
    with torch.no_grad():
        for _, p in r_adapter.adapter_parameters(model.clip):
            p.normal_(0, 0.05)
    ema = reparam.EMA(model.clip, m=0.5)
    with torch.no_grad():
        for _, p in r_adapter.adapter_parameters(model.clip):
            p.mul_(-1)
    ema.update(model.clip)  # the EMA differs from the live adapters
    images, E = torch.randn(2, 3, 64, 64), text()
    model.eval()
    with torch.no_grad():
        with ema.applied(model.clip):
            scaled = at_alpha(model.clip, 0.4).eval()
        live, model.clip = model.clip, scaled
        unmerged = model(images, E)
        model.clip = live
        with reparam.merged(model.clip, 0.4, ema=ema):
            merged = model(images, E)
            assert not any(isinstance(m, r_adapter.AdaptedLinear) for m in model.modules())
        plain = model(images, E)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, merged)  # the live adapters are back


def test_lora_merged_equals_unmerged_inside_the_segmenter():
    model = tiny_segmenter()
    lora.add_lora(model.clip, rank=2)
    with torch.no_grad():
        for n, p in model.clip.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    images, E = torch.randn(1, 3, 64, 64), text()
    model.eval()
    with torch.no_grad():
        unmerged = model(images, E)
        with reparam.merged(model.clip, 1.0):
            assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
            torch.testing.assert_close(model(images, E), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_vit_b16_at_384_px_gives_96_x_96_logits():
    torch.manual_seed(0)
    model = segment.CATSeg(CLIP(PRESETS["ViT-B-16"]), 1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384), text(C=3, P=1, e=512)).shape == (1, 3, 96, 96)
