"""segment.py: CAT-Seg's shapes, its cost volume, the class-order equivariance of class aggregation, the
shifted windows (their mask, and the block against Swin's attention by hand), the loss, the sliding window,
CAT-Seg's W_q/W_v tuning (W_k never moves), and the merged R-Adapter inside the segmenter. The released
model's pieces, each against a computation by hand: class padding and per-image class selection, the class
block's residual, the dense last block, the position embeddings' resampling, the test resize and the
released checkpoint's name map."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

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
@given(
    st.integers(2, 7),
    st.sampled_from([1, 2]),
    st.booleans(),
    st.sampled_from([0, 9]),
    st.sampled_from(["released", "update"]),
    st.randoms(use_true_random=False),
)
def test_class_aggregation_is_equivariant_to_the_class_order(C, pool, training, pad_len, residual, rnd):
    torch.manual_seed(rnd.randrange(2**31))
    block = segment.ClassBlock(16, 8, heads=2, pool=pool, pad_len=pad_len, residual=residual).train(training)
    if pad_len:
        torch.nn.init.normal_(block.padding_tokens), torch.nn.init.normal_(block.padding_guidance)
    x, guidance = torch.randn(2, C, 4, 4, 16), torch.randn(2, C, 8)
    perm = torch.tensor(rnd.sample(range(C), C))
    torch.testing.assert_close(block(x[:, perm], guidance[:, perm]), block(x, guidance)[:, perm], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("h, w", [(8, 8), (8, 12)])
def test_shifted_spatial_block_is_attention_within_the_shifted_windows(h, w):
    """Swin's shifted windows by hand (Liu et al. 2021, Sec. 3.2): the window at (top, left) of the grid shifted
    by s = window / 2 holds the tokens ((top + a + s) mod h, (left + b + s) mod w); two of them attend iff
    neither axis wrapped between them; each token's output goes back to its own place."""
    torch.manual_seed(0)
    block, window, heads = segment.SpatialBlock(dim=8, guidance=4, heads=2, shifted=True), 4, 2
    s = window // 2
    x, g = torch.randn(2, 3, h, w, 8), torch.randn(2, h, w, 4)
    y = block.norm1(x)
    q, k, v = block.q(y) + block.q_guide(g)[:, None], block.k(y) + block.k_guide(g)[:, None], block.v(y)
    attended = torch.zeros_like(x)
    for top in range(0, h, window):
        for left in range(0, w, window):
            a, b = torch.meshgrid(torch.arange(top, top + window), torch.arange(left, left + window), indexing="ij")
            a, b = a.flatten(), b.flatten()  # places in the shifted grid
            rows, cols = (a + s) % h, (b + s) % w  # the tokens' own places
            wrapped = torch.stack([a >= h - s, b >= w - s], -1)
            allowed = (wrapped[:, None] == wrapped[None, :]).all(-1)  # [T, T]
            for head in range(heads):
                part = slice(head * 4, head * 4 + 4)
                qh, kh, vh = (t[:, :, rows, cols, part] for t in (q, k, v))  # [B, C, T, 4]
                scores = (qh @ kh.transpose(-1, -2) / 2).masked_fill(~allowed, -torch.inf)  # / sqrt(4)
                attended[:, :, rows, cols, part] = scores.softmax(-1) @ vh
    expected = x + block.proj(attended)
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(block(x, g, window=window), expected, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("size", [64, 80])  # one crop (the toy's test), and 4 crops and the whole image
def test_sliding_window_scores_a_batch_as_each_image_alone(size):
    model = tiny_segmenter().eval()
    images = torch.randn(3, 3, 48, 56, generator=torch.Generator().manual_seed(0))
    batch = segment.sliding_window(model, images, text(C=3), window=64, size=size)
    alone = torch.stack([segment.sliding_window(model, image, text(C=3), window=64, size=size) for image in images])
    assert batch.shape == (3, 3, 48, 56)
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)


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


# ------------------------------------------------------------ the released model, piece by piece
def layer_norm(x, norm):
    """LayerNorm by hand, with norm's affine parameters."""
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(x, layer):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def released_class_layer(block, x, guidance, pool):
    """The released ClassTransformerLayer (model.py) by hand, one pooled pixel at a time: the pool x pool means
    of the C classes' embeddings, learned padding tokens up to pad_len; x + attention(norm1(x), guidance) with
    linear attention written as its kernel matrix; then + MLP(norm2(.)). Returns that [B, C, h', w', d] (the
    pooled input plus the update) and the pooled input."""
    B, C, h, w, d = x.shape
    pooled = x.view(B, C, h // pool, pool, w // pool, pool, d).mean((3, 5))  # [B, C, h', w', d]
    out = torch.zeros_like(pooled)
    S, heads = max(C, block.pad_len), block.heads
    for b in range(B):
        for i in range(h // pool):
            for j in range(w // pool):
                X = pooled[b, :, i, j]
                G = guidance[b]
                if S > C:
                    X = torch.cat([X, block.padding_tokens.expand(S - C, d)])  # [S, d]
                    G = torch.cat([G, block.padding_guidance.expand(S - C, -1)])  # [S, g]
                Z = layer_norm(X, block.norm1)
                Q, K, V = (
                    linear(Z, block.q) + linear(G, block.q_guide),
                    linear(Z, block.k) + linear(G, block.k_guide),
                    linear(Z, block.v),
                )
                attended = torch.zeros(S, d)
                for head in range(heads):
                    cols = slice(head * d // heads, (head + 1) * d // heads)
                    A = (F.elu(Q[:, cols]) + 1) @ (F.elu(K[:, cols]) + 1).T  # [S, S]: phi(q_i) . phi(k_j)
                    attended[:, cols] = A @ V[:, cols] / A.sum(1, keepdim=True)
                Y = X + attended
                Y = Y + linear(F.relu(linear(layer_norm(Y, block.norm2), block.mlp[0])), block.mlp[2])
                out[b, :, i, j] = Y[:C]
    return out, pooled


def upsampled(t, size):  # [B, C, h', w', d] -> [B, C, h, w, d], bilinear with aligned corners (as released)
    B, C = t.shape[:2]
    t = F.interpolate(t.permute(0, 1, 4, 2, 3).flatten(0, 1), size=size, mode="bilinear", align_corners=True)
    return t.unflatten(0, (B, C)).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("C, pad_len", [(3, 5), (3, 0), (4, 4)])
def test_class_block_pads_and_adds_its_residual_as_released(C, pad_len):
    """With 5 slots for 3 classes, two learned padding tokens join the attention; the released residual is
    x + up(pool(x) + delta), ours (class_residual="update") x + up(delta)."""
    torch.manual_seed(0)
    block = segment.ClassBlock(8, 4, heads=2, pool=2, pad_len=pad_len).train()
    if pad_len:
        torch.nn.init.normal_(block.padding_tokens), torch.nn.init.normal_(block.padding_guidance)
    x, guidance = torch.randn(2, C, 4, 4, 8), torch.randn(2, C, 4)
    with torch.no_grad():
        out, pooled = released_class_layer(block, x, guidance, pool=2)
        torch.testing.assert_close(block(x, guidance), x + upsampled(out, (4, 4)), rtol=1e-4, atol=1e-5)
        block.residual = "update"
        torch.testing.assert_close(block(x, guidance), x + upsampled(out - pooled, (4, 4)), rtol=1e-4, atol=1e-5)
        if pad_len > C:  # the padding tokens change what the real classes get
            unpadded = segment.ClassBlock(8, 4, heads=2, pool=2, residual="update").train()
            unpadded.load_state_dict(block.state_dict(), strict=False)
            assert not torch.allclose(unpadded(x, guidance), block(x, guidance), atol=1e-3)


def test_class_block_at_evaluation_adds_twice_the_input():
    """At evaluation (no pooling) the released residual is 2x + delta: x more than ours."""
    torch.manual_seed(0)
    block = segment.ClassBlock(8, 4, heads=2, pool=2, pad_len=6).eval()
    ours = segment.ClassBlock(8, 4, heads=2, pool=2, pad_len=6, residual="update").eval()
    ours.load_state_dict(block.state_dict())
    x, guidance = torch.randn(1, 3, 4, 4, 8), torch.randn(1, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x, guidance), ours(x, guidance) + x)


def test_more_classes_than_slots_keeps_each_images_best_classes_and_scores_the_rest_minus_100():
    """7 classes, 4 slots: each image keeps the 4 classes whose best cosine (any template, any pixel) is
    highest; their logits are those of the model given only those 4 classes, the others' are -100."""
    torch.manual_seed(0)
    model = segment.CATSeg(CLIP(TINY), 2, replace(segment.SMALL, pad_len=4)).eval()
    images, E = torch.randn(2, 3, 64, 64), text(C=7)
    kept_per_image = []
    with torch.no_grad():
        dense = model.clip.encode_dense(images)[0][:, 1:]  # [2, 64, e]
        for c, pixel in zip((0, 1, 5), (10, 30, 50)):  # classes 0, 1 and 5 are in image 0 (cosine 1) ...
            E[c, 1] = dense[0, pixel]
        for c, pixel in zip((2, 3, 6), (5, 25, 45)):  # ... 2, 3 and 6 in image 1
            E[c, 0] = dense[1, pixel]
        logits = model(images, E)
        for b in range(2):
            best = [max(F.cosine_similarity(dense[b], E[c, p][None], dim=-1).max() for p in range(2)) for c in range(7)]
            kept = sorted(torch.tensor(best).topk(4).indices.tolist())
            others = [c for c in range(7) if c not in kept]
            assert (logits[b, others] == -100).all()
            torch.testing.assert_close(logits[b, kept], model(images[b : b + 1], E[kept])[0], rtol=1e-4, atol=1e-5)
            kept_per_image.append(kept)
    assert {0, 1, 5} <= set(kept_per_image[0]) and {2, 3, 6} <= set(kept_per_image[1])  # each image's own


def test_dense_last_block_is_each_tokens_value_plus_the_class_tokens_residual():
    torch.manual_seed(0)
    clip = CLIP(TINY).eval()
    images, inputs = torch.randn(2, 3, 48, 48), []
    last = clip.visual.blocks[-1]
    hook = last.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        plain, _ = clip.encode_dense(images, last_block="attention")  # runs the last block: its input recorded
        hook.remove()
        dense, _ = clip.encode_dense(images)
        x, width = inputs[0], TINY.vision_width  # [2, 37, width]
        v = layer_norm(x, last.norm1) @ last.attn.qkv.weight[2 * width :].T + last.attn.qkv.bias[2 * width :]
        y = linear(v, last.attn.proj) + x[:, :1]  # W_O v_i + the class token's input
        hidden = linear(layer_norm(y, last.norm2), last.mlp.fc1)
        y = y + linear(hidden * torch.sigmoid(1.702 * hidden), last.mlp.fc2)  # QuickGELU
        expected = linear(layer_norm(y, clip.visual.norm), clip.visual.head)
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dense, plain, atol=1e-2)
    torch.testing.assert_close(plain[:, 0], clip.encode_image(images).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [16, 48, 56])  # 2 x 2, 6 x 6 and 7 x 7 patches; the embeddings are for 4 x 4
def test_position_embeddings_are_resampled_as_released(size):
    """The tokens entering the first block: each patch's embedding plus its position's, resized from the
    4 x 4 grid by F.interpolate (bicubic, no antialiasing), as the release's resized_pos_embed does."""
    torch.manual_seed(0)
    clip = CLIP(TINY).eval()
    images, n, seen = torch.randn(1, 3, size, size), size // 8, []
    clip.visual.norm_pre.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    grid = clip.visual.pos_embed[0, 1:].reshape(4, 4, -1).permute(2, 0, 1)[None]  # [1, width, 4, 4]
    resized = F.interpolate(grid, size=(n, n), mode="bicubic", align_corners=False)[0].flatten(1).T  # [n*n, width]
    patches = F.conv2d(images, clip.visual.patch_embed.proj.weight, stride=8)[0].flatten(1).T  # [n*n, width]
    cls = clip.visual.cls_token[0] + clip.visual.pos_embed[0, :1]
    expected = torch.cat([cls, patches + resized])
    with torch.no_grad():
        clip.encode_image(images)
        clip.encode_dense(images)
        clip.visual.pos_embed_antialias = True  # timm's default resampling: another kernel
        clip.encode_dense(images)
    torch.testing.assert_close(seen[0][0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[1][0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen[2][0], expected, atol=1e-4)


class Recorder(torch.nn.Module):
    """Stands in for CATSeg: records every input, scores every class 0."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, images, text):
        self.inputs.append(images)
        return torch.zeros(len(images), len(text), images.shape[-2] // 4, images.shape[-1] // 4)


def pil_resize(image, h, w):
    """PIL's bilinear resize (antialiased when shrinking) of each channel of [3, H, W], in float."""
    return torch.stack(
        [torch.from_numpy(np.array(Image.fromarray(c.numpy(), mode="F").resize((w, h), Image.BILINEAR))) for c in image]
    )


def test_test_resize_takes_the_shorter_side_to_size_first():
    """100 x 140 at size 40: PIL's antialiased bilinear to 40 x 56 (detectron2's ResizeShortestEdge), then
    40 x 40 cut into 24 px crops; the whole image at 24 x 24; probabilities back at 100 x 140."""
    image = torch.rand(3, 100, 140, generator=torch.Generator().manual_seed(0))
    model = Recorder()
    probs = segment.sliding_window(model, image, text(C=2), window=24, size=40)
    assert probs.shape == (2, 100, 140) and len(model.inputs) == 5
    short = pil_resize(image, 40, 56)[None]
    square = F.interpolate(short, size=(40, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.inputs[0], square[..., :24, :24], rtol=0, atol=1e-4)
    torch.testing.assert_close(model.inputs[3], square[..., 16:, 16:], rtol=0, atol=1e-4)
    whole = F.interpolate(short, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.inputs[4], whole, rtol=0, atol=1e-4)
    direct = Recorder()
    segment.sliding_window(direct, image, text(C=2), window=24, size=40, resize="direct")
    straight = F.interpolate(image[None], size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(direct.inputs[4], straight)
    assert not torch.allclose(direct.inputs[4], whole, atol=1e-2)


# ------------------------------------------------------------ a released checkpoint
def released_state_dict(model, templates):
    """The names and shapes of a released CAT-Seg checkpoint of model's sizes (model.py and cat_seg_model.py
    of the release), random values; its CLIP in OpenAI's names with W_q, W_k, W_v apart."""
    cfg, head = model.clip.config, model.head
    d, g, e, vw = head.hidden, head.guidance, cfg.embed_dim, cfg.vision_width
    (g1, g2), (p1, p2), (o1, o2) = head.decoder_guidance, head.decoder_guidance_proj, head.decoder
    T = "sem_seg_head.predictor.transformer."
    shapes = {
        "upsample1.weight": (vw, g1, 2, 2), "upsample1.bias": (g1,),
        "upsample2.weight": (vw, g2, 4, 4), "upsample2.bias": (g2,),
        T + "conv1.weight": (d, templates, 7, 7), T + "conv1.bias": (d,),
        T + "guidance_projection.0.weight": (g, e, 3, 3), T + "guidance_projection.0.bias": (g,),
        T + "text_guidance_projection.0.weight": (g, e), T + "text_guidance_projection.0.bias": (g,),
        T + "decoder_guidance_projection.0.0.weight": (p1, g1, 3, 3), T + "decoder_guidance_projection.0.0.bias": (p1,),
        T + "decoder_guidance_projection.1.0.weight": (p2, g2, 3, 3), T + "decoder_guidance_projection.1.0.bias": (p2,),
        T + "head.weight": (1, o2, 3, 3), T + "head.bias": (1,),
    }  # fmt: skip
    for k, (i, o, p) in enumerate(((d, o1, p1), (o1, o2, p2)), start=1):
        D = f"{T}decoder{k}."
        shapes.update({D + "up.weight": (i, i - p, 2, 2), D + "up.bias": (i - p,)})
        shapes.update({D + "conv.double_conv.0.weight": (o, i, 3, 3), D + "conv.double_conv.3.weight": (o, o, 3, 3)})
        shapes.update({D + f"conv.double_conv.{n}.{w}": (o,) for n in (1, 4) for w in ("weight", "bias")})
    for i in range(head.layers):
        L = f"{T}layers.{i}."
        shapes.update({L + f"swin_block.guidance_norm.{w}": (g,) for w in ("weight", "bias")})
        for j in (1, 2):
            S = f"{L}swin_block.block_{j}."
            shapes.update({S + f"{n}.{w}": (d,) for n in ("norm1", "norm2") for w in ("weight", "bias")})
            shapes.update({S + f"attn.{n}.weight": (d, d + g) for n in ("q", "k")})
            shapes.update({S + f"attn.{n}.weight": (d, d) for n in ("v", "proj")})
            shapes.update({S + f"attn.{n}.bias": (d,) for n in ("q", "k", "v", "proj")})
            shapes.update({S + "mlp.fc1.weight": (4 * d, d), S + "mlp.fc1.bias": (4 * d,)})
            shapes.update({S + "mlp.fc2.weight": (d, 4 * d), S + "mlp.fc2.bias": (d,)})
        shapes[f"{L}swin_block.block_2.attn_mask"] = (4, head.window**2, head.window**2)
        A = f"{L}attention."
        shapes.update({A + f"{n}.{w}": (d,) for n in ("norm1", "norm2") for w in ("weight", "bias")})
        shapes.update({A + f"attention.{n}.weight": (d, d + g) for n in ("q", "k")})
        shapes.update({A + "attention.v.weight": (d, d), **{A + f"attention.{n}.bias": (d,) for n in "qkv"}})
        shapes.update({A + "MLP.0.weight": (4 * d, d), A + "MLP.0.bias": (4 * d,)})
        shapes.update({A + "MLP.2.weight": (d, 4 * d), A + "MLP.2.bias": (d,)})
        shapes.update({A + "padding_tokens": (1, 1, d), A + "padding_guidance": (1, 1, g)})
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    for key, value in to_openai_state_dict(CLIP(cfg)).items():
        if key.endswith("attn.in_proj_weight"):
            for name, w in zip("qkv", value.chunk(3)):
                state[f"sem_seg_head.predictor.clip_model.{key[: -len('in_proj_weight')]}{name}_proj_weight"] = w
        else:
            state[f"sem_seg_head.predictor.clip_model.{key}"] = value
    return state


def test_a_released_checkpoint_loads_under_the_name_map():
    torch.manual_seed(0)
    model = segment.CATSeg(CLIP(TINY), 2, segment.SMALL)
    released = released_state_dict(model, templates=2)
    model.load_state_dict(segment.from_released_state_dict(released, model))  # strict: every name, every shape
    T, d = "sem_seg_head.predictor.transformer.", segment.SMALL.hidden
    x, g = torch.randn(5, d), torch.randn(5, segment.SMALL.guidance)
    with torch.no_grad():
        for ours, theirs in (
            (model.spatial[1], f"{T}layers.0.swin_block.block_2.attn."),  # the shifted block
            (model.classwise[0], f"{T}layers.0.attention.attention."),
        ):
            for n in ("q", "k"):  # the released layer reads [x; guidance]
                expected = F.linear(
                    torch.cat([x, g], -1), released[theirs + f"{n}.weight"], released[theirs + f"{n}.bias"]
                )
                torch.testing.assert_close(getattr(ours, n)(x) + getattr(ours, f"{n}_guide")(g), expected)
    pad = released[f"{T}layers.0.attention.padding_tokens"]
    assert torch.equal(model.classwise[0].padding_tokens, pad.flatten())
    assert torch.equal(model.decoder[1].conv[3].weight, released[f"{T}decoder2.conv.double_conv.3.weight"])
    assert torch.equal(model.block_up[1].weight, released["upsample2.weight"])
    prefix = "sem_seg_head.predictor.clip_model.visual.transformer.resblocks.2.attn."
    qkv = torch.cat([released[f"{prefix}{n}_proj_weight"] for n in "qkv"])
    assert torch.equal(model.clip.visual.blocks[2].attn.qkv.weight, qkv)
    with pytest.raises(KeyError, match="not a parameter of the released CAT-Seg"):
        segment.from_released_state_dict({**released, "sem_seg_head.predictor.bogus.weight": x}, model)
