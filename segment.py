"""CAT-Seg (Cho et al., CVPR 2024): open-vocabulary segmentation by aggregating CLIP's image-text cost.

For an image and C class names, each written in P prompt templates (Sec. 3, "Cost computation and
embedding"):
  D = dense CLIP image features: every patch token through the final norm and projection, at 384 px
      (a 24 x 24 grid for ViT-B/16; clip_model.encode_dense, its last block without attention)
  E = CLIP text embeddings, one per class and template (the prompt ensemble)
  cost(i, c, p) = D_i . E_cp / (|D_i| |E_cp|)   the cost volume, per pixel i, class c, template p
  F = conv7x7(cost): a d-dim cost embedding per class and pixel
Aggregation, `layers` times (Sec. 3, "Cost aggregation"):
  spatial: per class, two Swin blocks (Liu et al., ICCV 2021), window 12, the second shifted by 6
  class:   per pixel, a linear-attention block (Katharopoulos et al., ICML 2020) across the classes,
           with no positional encoding, so the model is equivariant to the order of the classes
  embedding guidance: projected D joins the spatial queries and keys, projected E the class ones
Upsampling decoder: two x2 stages (transposed conv, guidance concatenated, 2 x (conv3x3, GN, ReLU)),
guided by the outputs of CLIP image blocks 4 and 8 of 12 (x2 and x4 transposed convs); a conv3x3 gives
one logit per class and pixel at 1/4 of the input. Loss: per-pixel, per-class binary cross-entropy on
the logits upsampled to the labels. Inference: sliding window (below). CLIP tuning (Sec. 4, "fine-tuning
CLIP"): only the query and value projections W_q, W_v of every attention block of both towers.

This is the model of CAT-Seg's release (github.com/cvlab-kaist/CAT-Seg, commit 6d3a188); each deliberate
deviation has one switch, the release's setting its default (docs/segmentation.md): HeadConfig.pad_len (256
class slots: learned padding tokens, or each image's 256 best classes, the rest at -100 | 0: the C classes),
HeadConfig.class_residual (x + up(pool(x) + delta) | "update": x + up(delta)), HeadConfig.last_block
(clip_model.value_block | "attention"), sliding_window's resize ("shortest-edge" | "direct").
from_released_state_dict maps a released checkpoint's names to ours.
"""

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

from clip_model import tokenize
from clip_weights import from_openai_state_dict
from data.segmentation import shortest_edge
from method import Method


@dataclass(frozen=True)
class HeadConfig:
    """CAT-Seg's aggregator and decoder; defaults from the released ViT-B/16 config (configs/vitb_384.yaml)."""

    hidden: int = 128  # cost embedding width d
    heads: int = 4
    layers: int = 2  # (spatial, class) aggregation pairs
    window: int = 12  # Swin window on the feature grid
    guidance: int = 128  # projected appearance (image) and text guidance
    decoder: tuple = (64, 32)  # widths of the two x2 decoder stages
    decoder_guidance: tuple = (256, 128)  # CLIP block features after the x2 and x4 transposed convs
    decoder_guidance_proj: tuple = (32, 16)  # ... projected to this and concatenated in the decoder
    pool: int = 2  # training only: class aggregation on pool x pool averaged costs (released eval: 1)
    # the released model; each switch's other setting is ours from before, kept for comparison
    pad_len: int = 256  # class slots in class aggregation (released); 0: attend over exactly the C classes
    class_residual: str = "released"  # x + up(pool(x) + delta), 2x + delta at evaluation | "update": x + up(delta)
    last_block: str = "values"  # dense CLIP features: the release's last block | "attention": the plain block


# for the tiny and toy CLIPs (tests, the toy world): a quarter of the widths, one aggregation pair, 4-token windows
SMALL = HeadConfig(
    hidden=32,
    heads=2,
    layers=1,
    window=4,
    guidance=32,
    decoder=(16, 8),
    decoder_guidance=(64, 32),
    decoder_guidance_proj=(8, 4),
)
# the toy job's (train_seg.py --data toy-seg): SMALL with the class padding scaled as the widths are, 1.5 slots
# per training class (released: 256 for COCO-Stuff's 171), so its 8 training and 12 test classes fit
TOY = dataclasses.replace(SMALL, pad_len=12)


def class_tokens(names, templates, context_length=77):
    """[C, P, L] tokens: every class name in every template. A name listing synonyms ("sofa, couch") is
    prompted with its first one, as the released code does."""
    texts = [t.format(name.split(", ")[0]) for name in names for t in templates]
    return tokenize(texts, context_length).view(len(names), len(templates), -1)  # [C*P, L] -> [C, P, L]


def cost_volume(dense, text):
    """Cosine similarity of every pixel and every (class, template) embedding.
    dense [B, e, h, w], text [C, P, e] -> [B, C, P, h, w]."""
    return torch.einsum("bdhw,cpd->bcphw", F.normalize(dense, dim=1), F.normalize(text, dim=-1))  # [B, C, P, h, w]


def bce_loss(logits, labels):
    """Per-pixel, per-class binary cross-entropy against one-hot labels, the logits [B, C, h, w] upsampled
    (bilinear) to the labels [B, H, W]. An IGNORE pixel is a negative for every class, as in the released
    code (its target there is all zeros). A value >= C that is not the ignore value stops the released code
    (its one-hot has C columns); here it is a negative for every class too."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    C = logits.shape[1]
    known = (labels >= 0) & (labels < C)
    target = F.one_hot(labels.clamp(0, C - 1), C).permute(0, 3, 1, 2) * known[:, None]  # [B, C, H, W]
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


# ------------------------------------------------------------- CLIP tuning
class QKV(nn.Module):
    """A fused qkv Linear held as its row blocks W_q, W_k, W_v ([d, d] each) and the fused bias, so that
    each block trains or stays frozen on its own. It computes the Linear it replaces, and its state dict
    holds the fused 'weight' [3d, d] and 'bias', so checkpoints and open_clip see a plain CLIP."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        W_q, W_k, W_v = linear.weight.detach().chunk(3)
        trains = linear.weight.requires_grad
        self.W_q, self.W_k, self.W_v = (nn.Parameter(w.clone(), requires_grad=trains) for w in (W_q, W_k, W_v))
        self.bias = linear.bias
        self.register_state_dict_post_hook(_fuse_qkv)
        self.register_load_state_dict_pre_hook(_split_qkv)

    @property
    def weight(self):  # [3d, d]
        return torch.cat([self.W_q, self.W_k, self.W_v])

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _fuse_qkv(module, state_dict, prefix, local_metadata):
    for name in ("W_q", "W_k", "W_v"):
        del state_dict[prefix + name]
    state_dict[prefix + "weight"] = module.weight.detach()


def _split_qkv(module, state_dict, prefix, *args):
    if prefix + "weight" in state_dict:
        for name, w in zip(("W_q", "W_k", "W_v"), state_dict.pop(prefix + "weight").chunk(3)):
            state_dict[prefix + name] = w


def tune_qv(clip):
    """CAT-Seg's CLIP fine-tuning: W_q and W_v of every attention block of both towers train; W_k, the
    qkv bias (one tensor for q, k and v, which the released code leaves frozen) and the rest stay frozen.
    The qkv layers are split into QKV modules, so W_k is a frozen tensor no optimiser (or weight decay) sees."""
    clip.requires_grad_(False)
    for tower in (clip.visual, clip.text):
        for block in tower.blocks:
            block.attn.qkv = QKV(block.attn.qkv)
            block.attn.qkv.W_q.requires_grad_(True)
            block.attn.qkv.W_v.requires_grad_(True)
    return clip


def setup_catseg(clip, cfg, task):
    """train_seg.py --method catseg (method.py's contract): W_q and W_v train on the task's loss."""
    tune_qv(clip)
    return Method(loss=task.objective, rows=[(cfg.method, None)])


# ------------------------------------------------------------ aggregation
def _shift_mask(h, w, window, shift, device):
    """[windows, T, T] bool, True where two tokens of a window may attend: after the cyclic shift, the
    windows on the bottom and right edges hold up to 3 x 3 regions that were not neighbours."""

    def region(n):  # 0, 1 or 2 along one axis: before the last window, inside it before the wrap, wrapped
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    ids = (3 * region(h)[:, None] + region(w)[None, :]).float()[None, :, :, None]  # [1, h, w, 1]
    ids = window_partition(ids, (window, window)).flatten(1)  # [windows, T]
    return ids[:, :, None] == ids[:, None, :]


class SpatialBlock(nn.Module):
    """A Swin block on one class's cost embedding: (shifted) window self-attention whose queries and keys
    also see the appearance guidance, then an MLP. q = W_q [x; g] is computed as W_q^x x + W_q^g g, so the
    guidance term is computed once per image, not once per class."""

    def __init__(self, dim, guidance, heads, shifted):
        super().__init__()
        self.heads, self.shifted = heads, shifted
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_guide, self.k_guide = nn.Linear(guidance, dim, bias=False), nn.Linear(guidance, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, guidance, window):  # x [B, C, h, w, d], guidance [B, h, w, g]
        B, C, h, w, d = x.shape
        shift = window // 2 if self.shifted and window < min(h, w) else 0
        y = self.norm1(x)
        q = self.q(y) + self.q_guide(guidance)[:, None]
        k = self.k(y) + self.k_guide(guidance)[:, None]
        q, k, v = (torch.roll(t, (-shift, -shift), dims=(2, 3)) for t in (q, k, self.v(y)))
        # [B, C, h, w, d] -> windows [B*C*windows, window, window, d] -> windows of T = window^2 tokens, heads
        # split: [B*C, windows, T, heads, d/heads] -> [B*C, windows, heads, T, d/heads]
        q, k, v = (window_partition(t.flatten(0, 1), (window, window)) for t in (q, k, v))
        q, k, v = (t.view(B * C, -1, window * window, self.heads, d // self.heads).transpose(2, 3) for t in (q, k, v))
        mask = _shift_mask(h, w, window, shift, x.device)[:, None] if shift else None  # [windows, 1, T, T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(2, 3).reshape(-1, window, window, d)  # [B*C*windows, T, heads, d/heads] -> windows of d
        y = window_reverse(y, (window, window), h, w)  # [B*C, h, w, d]
        y = torch.roll(y, (shift, shift), dims=(1, 2)).view(B, C, h, w, d)  # [B*C, h, w, d] -> [B, C, h, w, d]
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


def linear_attention(q, k, v, eps=1e-6):
    """softmax-free attention with the feature map elu(x) + 1 (Katharopoulos et al., ICML 2020), over the
    second axis: q, k, v [N, S, heads, d] -> [N, S, heads, d]. Permuting S permutes the output alike."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("nshd,nshe->nhde", k, v)  # [N, heads, d, d]: sum over s of k_s v_s^T
    z = 1 / (torch.einsum("nshd,nhd->nsh", q, k.sum(1)) + eps)  # [N, S, heads]: 1 / (q_s . sum of k)
    return torch.einsum("nshd,nhde,nsh->nshe", q, kv, z)  # [N, S, heads, d]


class ClassBlock(nn.Module):
    """Attention across the classes at every pixel (averaged over pool x pool pixels in training), with the
    text guidance joining the queries and keys and no positional encoding; then an MLP. With pad_len > C,
    learned padding tokens (and padding guidance) fill the sequence up to pad_len class slots, as the released
    ClassTransformerLayer does; they shape the other classes' attention and are dropped after it. residual:
    "released" adds the pooled input and the update back (x + up(pool(x) + delta)), "update" only the update."""

    def __init__(self, dim, guidance, heads, pool, pad_len=0, residual="released"):
        super().__init__()
        if residual not in ("released", "update"):
            raise ValueError(f"class_residual {residual!r}: expected released or update")
        self.heads, self.pool, self.pad_len, self.residual = heads, pool, pad_len, residual
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_guide, self.k_guide = nn.Linear(guidance, dim, bias=False), nn.Linear(guidance, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        if pad_len:
            self.padding_tokens = nn.Parameter(torch.zeros(dim))  # zero-initialised, as released
            self.padding_guidance = nn.Parameter(torch.zeros(guidance))

    def forward(self, x, guidance):  # x [B, C, h, w, d], guidance [B, C, g]
        B, C, h, w, d = x.shape
        pool = self.pool if self.training else 1
        y = x.permute(0, 1, 4, 2, 3).flatten(0, 1)  # [B*C, d, h, w]
        y = F.avg_pool2d(y, pool) if pool > 1 else y
        hp, wp = y.shape[-2:]
        y = y.unflatten(0, (B, C)).permute(0, 3, 4, 1, 2).flatten(0, 2)  # [B*h'*w', C, d]: a sequence of classes
        S = max(C, self.pad_len)
        if S > C:  # the padding tokens, the same at every pixel: [B*h'*w', S, d] and [B, S, g]
            y = torch.cat([y, self.padding_tokens.expand(len(y), S - C, d)], dim=1)
            guidance = torch.cat([guidance, self.padding_guidance.expand(B, S - C, -1)], dim=1)
        q_guide, k_guide = (  # [B, S, d] -> [B*h'*w', S, d], each image's guidance at each of its pixels
            proj(guidance).repeat_interleave(hp * wp, dim=0) for proj in (self.q_guide, self.k_guide)
        )
        z = self.norm1(y)
        q, k, v = self.q(z) + q_guide, self.k(z) + k_guide, self.v(z)
        z = linear_attention(*(t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))).flatten(-2)  # [N, S, d]
        delta = z + self.mlp(self.norm2(y + z))  # the block's update of y
        out = y + delta if self.residual == "released" else delta
        out = out[:, :C].unflatten(0, (B, hp, wp)).permute(0, 3, 4, 1, 2).flatten(0, 1)  # [B*C, d, h', w']
        if pool > 1:
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        return x + out.unflatten(0, (B, C)).permute(0, 1, 3, 4, 2)  # [B, C, h, w, d]


class Up(nn.Module):
    """One x2 decoder stage: transposed conv, the guidance concatenated, 2 x (conv3x3, GroupNorm, ReLU)."""

    def __init__(self, dim, out, guidance):
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim - guidance, 2, stride=2)
        groups = max(1, out // 16)
        self.conv = nn.Sequential(
            nn.Conv2d(dim, out, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out),
            nn.ReLU(),
            nn.Conv2d(out, out, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out),
            nn.ReLU(),
        )

    def forward(self, x, guidance):  # x [B*C, dim, h, w], guidance [B, g, 2h, 2w]
        guidance = guidance.repeat_interleave(len(x) // len(guidance), dim=0)
        x = torch.cat([self.up(x), guidance.contiguous(memory_format=torch.channels_last)], dim=1)
        return self.conv(x)  # channels_last, as self.up gives it: oneDNN's fast layout for few channels


# ---------------------------------------------------------------- the model
class CATSeg(nn.Module):
    """logits [B, C, H/4, W/4] = model(images [B, 3, H, W], text): text is [C, P, e] class embeddings
    (embed_text, computed once for many images at evaluation) or [C, P, L] tokens, embedded in the forward
    pass (training, where the text tower may be training too)."""

    def __init__(self, clip, templates: int, head: HeadConfig = HeadConfig()):
        super().__init__()
        cfg, self.head = clip.config, head
        self.clip = clip
        n = cfg.vision_layers
        self.blocks = (n // 3 - 1, 2 * n // 3 - 1)  # guidance blocks: 4 and 8 of 12 (ViT-B), 8 and 16 of 24 (ViT-L)
        d, g = head.hidden, head.guidance
        self.cost_embed = nn.Conv2d(templates, d, 7, padding=3)
        self.image_guide = nn.Sequential(nn.Conv2d(cfg.embed_dim, g, 3, padding=1), nn.ReLU())
        self.text_guide = nn.Sequential(nn.Linear(cfg.embed_dim, g), nn.ReLU())
        self.guide_norms = nn.ModuleList([nn.LayerNorm(g) for _ in range(head.layers)])
        self.spatial = nn.ModuleList(
            [SpatialBlock(d, g, head.heads, shifted) for _ in range(head.layers) for shifted in (False, True)]
        )
        self.classwise = nn.ModuleList(
            [ClassBlock(d, g, head.heads, head.pool, head.pad_len, head.class_residual) for _ in range(head.layers)]
        )
        (g1, g2), (p1, p2) = head.decoder_guidance, head.decoder_guidance_proj
        self.block_up = nn.ModuleList(
            [
                nn.ConvTranspose2d(cfg.vision_width, g1, 2, stride=2),
                nn.ConvTranspose2d(cfg.vision_width, g2, 4, stride=4),
            ]
        )
        self.block_guide = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, p, 3, padding=1), nn.ReLU()) for c, p in ((g1, p1), (g2, p2))]
        )
        (o1, o2) = head.decoder
        self.decoder = nn.ModuleList([Up(d, o1, p1), Up(o1, o2, p2)])
        self.out = nn.Conv2d(o2, 1, 3, padding=1)

    @property
    def config(self):  # the CLIP's (train.py's checkpoints record it)
        return self.clip.config

    def embed_text(self, tokens):  # [C, P, L] -> [C, P, e]
        return self.clip.encode_text(tokens.flatten(0, 1)).view(*tokens.shape[:2], -1)  # [C*P, e] -> [C, P, e]

    def forward(self, images, text):
        if not text.is_floating_point():
            text = self.embed_text(text)
        tokens, blocks = self.clip.encode_dense(images, self.blocks, last_block=self.head.last_block)
        B, _, h, w = blocks[0].shape
        if h % min(self.head.window, h) or w % min(self.head.window, w):
            raise ValueError(f"a {h} x {w} feature grid does not split into {self.head.window}-token windows")
        window = min(self.head.window, h, w)
        dense = tokens[:, 1:].transpose(1, 2).unflatten(2, (h, w))  # [B, e, h*w] -> [B, e, h, w]
        cost = cost_volume(dense, text)  # [B, C, P, h, w]
        C, kept = cost.shape[1], None
        text = text.expand(B, *text.shape)  # [B, C, P, e]
        if 0 < self.head.pad_len < C:  # each image keeps its pad_len classes of highest cosine at any pixel
            kept = cost.flatten(2).amax(-1).topk(self.head.pad_len, dim=1, sorted=False).indices  # [B, K]
            cost = cost.gather(1, kept[:, :, None, None, None].expand(-1, -1, *cost.shape[2:]))  # [B, K, P, h, w]
            text = text.gather(1, kept[:, :, None, None].expand(-1, -1, *text.shape[2:]))  # [B, K, P, e]
        K = cost.shape[1]
        x = self.cost_embed(cost.flatten(0, 1)).unflatten(0, (B, K)).permute(0, 1, 3, 4, 2)  # [B, K, h, w, d]
        image_guide = self.image_guide(dense).permute(0, 2, 3, 1)  # [B, g, h, w] -> [B, h, w, g]
        text_guide = self.text_guide(F.normalize(F.normalize(text, dim=-1).mean(2), dim=-1))  # [B, K, g]
        for i, norm in enumerate(self.guide_norms):
            for block in self.spatial[2 * i : 2 * i + 2]:
                x = block(x, norm(image_guide), window)
            x = self.classwise[i](x, text_guide)
        x = x.permute(0, 1, 4, 2, 3).flatten(0, 1)  # [B, K, h, w, d] -> [B*K, d, h, w]
        x = x.contiguous(memory_format=torch.channels_last)  # the decoder's layout (Up)
        for up, guide, block_up, feature in zip(self.decoder, self.block_guide, self.block_up, blocks):
            x = up(x, guide(block_up(feature)))
        logits = self.out(x).view(B, K, 4 * h, 4 * w)  # [B*K, 1, 4h, 4w] -> [B, K, 4h, 4w]
        if kept is None:
            return logits
        full = logits.new_full((B, C, 4 * h, 4 * w), -100.0)  # a class not kept scores -100, as released
        return full.scatter(1, kept[:, :, None, None].expand_as(logits), logits)


# ------------------------------------------------------- released checkpoints
_RELEASED = "sem_seg_head.predictor.transformer."
_RELEASED_CLIP = "sem_seg_head.predictor.clip_model."
_HEAD_NAMES = [  # (a released name after _RELEASED, or upsample at the top level, as a regex; ours); MLP -> mlp
    (r"upsample([12])\.", lambda m: f"block_up.{int(m[1]) - 1}."),
    (r"conv1\.", lambda m: "cost_embed."),
    (r"guidance_projection\.0\.", lambda m: "image_guide.0."),
    (r"text_guidance_projection\.0\.", lambda m: "text_guide.0."),
    (r"decoder_guidance_projection\.(\d)\.0\.", lambda m: f"block_guide.{m[1]}.0."),
    (r"decoder([12])\.up\.", lambda m: f"decoder.{int(m[1]) - 1}.up."),
    (r"decoder([12])\.conv\.double_conv\.", lambda m: f"decoder.{int(m[1]) - 1}.conv."),
    (r"head\.", lambda m: "out."),
    (r"layers\.(\d+)\.swin_block\.guidance_norm\.", lambda m: f"guide_norms.{m[1]}."),
    (r"layers\.(\d+)\.swin_block\.block_([12])\.(?:attn\.)?", lambda m: f"spatial.{2 * int(m[1]) + int(m[2]) - 1}."),
    (r"layers\.(\d+)\.attention\.(?:attention\.)?", lambda m: f"classwise.{m[1]}."),
]


def from_released_state_dict(state_dict, model):
    """A released CAT-Seg checkpoint's tensors (model_final.pth's "model") under our names (_HEAD_NAMES; the
    CLIP's through clip_weights), for model.load_state_dict on a CATSeg whose CLIP no method has changed yet.
    The released q and k of both kinds of block read [x; guidance]: each weight [d, d + g] is split into ours
    (x) and q_guide / k_guide (guidance). Its CLIP holds W_q, W_k, W_v apart (q_proj_weight, ...): they are
    fused into OpenAI's in_proj_weight. The spatial blocks' attn_mask buffers are dropped (computed here)."""
    ours, clip = {}, {}
    for key, value in state_dict.items():
        if key.startswith(_RELEASED_CLIP):
            clip[key[len(_RELEASED_CLIP) :]] = value
            continue
        if key.endswith(".attn_mask"):
            continue  # the shifted windows' mask, a buffer we compute
        name = key[len(_RELEASED) :] if key.startswith(_RELEASED) else key
        for pattern, rename in _HEAD_NAMES:
            m = re.match(pattern, name)
            if m:
                name = rename(m) + name[m.end() :]
                break
        else:
            raise KeyError(f"{key}: not a parameter of the released CAT-Seg (segment.from_released_state_dict)")
        name = name.replace(".MLP.", ".mlp.")
        block, proj, kind = name.rpartition(".")[0].rpartition(".")[0], name.split(".")[-2], name.split(".")[-1]
        if proj in ("q", "k") and kind == "weight":  # [d, d + g] -> [d, d] and [d, g]
            d = value.shape[0]
            ours[name], ours[f"{block}.{proj}_guide.weight"] = value[:, :d], value[:, d:]
        else:
            padding = name.endswith(("padding_tokens", "padding_guidance"))
            ours[name] = value.reshape(-1) if padding else value  # padding: [1, 1, d] -> [d]
    for key in [k for k in clip if k.endswith("attn.q_proj_weight")]:
        prefix = key[: -len("q_proj_weight")]  # [d, d] x 3 -> [3d, d]
        clip[prefix + "in_proj_weight"] = torch.cat([clip.pop(prefix + f"{w}_proj_weight") for w in "qkv"])
    ours.update({f"clip.{k}": v for k, v in from_openai_state_dict(clip, model.clip).items()})
    return ours


@torch.no_grad()
def sliding_window(model, image, text, window=384, overlap=1 / 3, size=640, resize="shortest-edge", max_size=2560):
    """Class probabilities [C, H, W] of one image [3, H, W] ([B, C, H, W] of B images of one size, scored
    together), as the released evaluation computes them (eval.sh): the test resize, detectron2's
    ResizeShortestEdge (shorter side to `size`, the longer at most max_size; bilinear, antialiased), then
    CATSeg.inference_sliding_window: the image resized to size x size and cut into window x window crops
    overlapping by `overlap`, the sigmoid scores averaged over the crops, then with those of the whole image at
    window x window, and resized to H x W (bilinear). The release resizes the uint8 image with PIL, we the
    normalised one (the same filter; no rounding to 8 bits). Switch: resize = "direct" skips the shorter-side
    step. With size = window the one crop is the whole image, scored once."""
    if image.dim() == 3:
        return sliding_window(model, image[None], text, window, overlap, size, resize, max_size)[0]
    H, W = image.shape[-2:]
    if resize not in ("shortest-edge", "direct"):
        raise ValueError(f"resize {resize!r}: expected shortest-edge or direct")
    if resize == "shortest-edge" and shortest_edge(H, W, size, max_size) != (H, W):
        image = F.interpolate(
            image, size=shortest_edge(H, W, size, max_size), mode="bilinear", antialias=True, align_corners=False
        )
    x = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)  # [B, 3, size, size]
    stride = int(window * (1 - overlap))
    starts = sorted({*range(0, size - window, stride), size - window})

    def scores(crop, out):  # [B, 3, window, window] -> [B, C, out, out] probabilities
        logits = F.interpolate(model(crop, text), size=(out, out), mode="bilinear", align_corners=False)
        return logits.float().sigmoid()

    if size == window:
        return F.interpolate(scores(x, window), size=(H, W), mode="bilinear", align_corners=False)
    total = torch.zeros(len(image), len(text), size, size, device=image.device)
    count = torch.zeros(size, size, device=image.device)
    for top in starts:
        for left in starts:
            total[..., top : top + window, left : left + window] += scores(
                x[..., top : top + window, left : left + window], window
            )
            count[top : top + window, left : left + window] += 1
    whole = F.interpolate(image, size=(window, window), mode="bilinear", align_corners=False)
    whole = F.interpolate(scores(whole, window), size=(size, size), mode="bilinear", align_corners=False)
    probs = (total / count + whole) / 2
    return F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False)
