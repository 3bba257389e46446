"""CLIP (Radford et al., ICML 2021), built from scratch: the model both papers start from.

An image encoder f (a ViT) and a text encoder g (a causal transformer over BPE tokens, pooled at
the end-of-text token), each followed by a linear projection into a shared embedding space.
Logits are s * f(x) . g(t) on L2-normalised features, with the learned scale s = exp(logit_scale)
(100 for OpenAI weights, tau = 1/s = 0.01).

  image tower : timm's `VisionTransformer` configured as CLIP (pre-norm `ln_pre`, no patch-embedding
                bias, class token, final norm, bias-free projection head, QuickGELU for OpenAI
                weights). Any input size runs: the position embeddings are resampled to the patch grid
                as CAT-Seg's release resamples them (ImageTower), and encode_dense gives every token's
                feature and intermediate block outputs (segment.py), its last block as that release runs it.
  text tower  : `TextTransformer` below, handwritten, with timm's module names (`norm1`, `attn.qkv`,
                `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`), so that code walking the blocks of
                either tower (r_adapter.py, clipfit.py, baselines.py) sees the same structure.

Public weights load through clip_weights.py.
"""

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision import transforms

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # OpenAI's rule: heads = width // 64, in both towers


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def autocast_dtype(device, precision="auto"):
    """The autocast dtype of --precision: bf16 on CUDA by default, none (fp32) on CPU."""
    auto = torch.bfloat16 if torch.device(device).type == "cuda" else None
    return {"auto": auto, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    quick_gelu: bool = True  # OpenAI weights use QuickGELU, open_clip's own runs GELU


# CPU-sized (tests, and open_clip's oracle): 32 px images in 4x4 patches of 8 px, a 4-layer image and a
# 2-layer text tower, captions of up to 20 tokens, the real BPE vocabulary. About 0.13 GFLOP per
# image-caption pair for a training step (forward + backward).
TINY = CLIPConfig(
    embed_dim=128,
    image_size=32,
    patch_size=8,
    vision_width=128,
    vision_layers=4,
    context_length=20,
    text_width=128,
    text_layers=2,
)
PRESETS = {
    "ViT-B-32": CLIPConfig(patch_size=32),
    "ViT-B-16": CLIPConfig(),
    "ViT-L-14": CLIPConfig(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, text_width=768),
    "tiny": TINY,
    # The toy world's CLIP (train.py --model toy): tiny with 6 image blocks, so that everything before
    # the first block is one linear patch embedding, as in CLIP; a 64-wide text tower keeps the shipped
    # fp16 file under 10 MB (the 49,408-row token embedding is most of it).
    "toy": replace(TINY, vision_layers=6, text_width=64),
}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI trained CLIP with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# ---------------------------------------------------------------- text tower
class Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    def __init__(self, width):
        super().__init__()
        self.heads = width // HEAD_WIDTH
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)  # W_O: R-Adapter's first adapter follows it

    def forward(self, x):  # x: [N, L, width]
        N, L, D = x.shape
        qkv = self.qkv(x).view(N, L, 3, self.heads, D // self.heads)  # [N, L, 3, heads, D/heads]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, L, D/heads]
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N, heads, L, D/heads]
        return self.proj(x.transpose(1, 2).reshape(N, L, D))  # heads side by side: [N, L, D]


class Mlp(nn.Module):
    """FFN = Linear(d, 4d) -> act -> Linear(4d, d)."""

    def __init__(self, width, act_layer):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = act_layer()
        self.fc2 = nn.Linear(4 * width, width)  # W_2: R-Adapter's second adapter follows it

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + MHA(LN1(x)), then x + FFN(LN2(x))."""

    def __init__(self, width, act_layer):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, act_layer)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """g: token + position embedding, causal blocks, ln_final, pool at EOT, project."""

    def __init__(self, cfg: CLIPConfig, act_layer):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.blocks = nn.Sequential(*[Block(cfg.text_width, act_layer) for _ in range(cfg.text_layers)])
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.grad_checkpointing = False  # CLIP.set_grad_checkpointing
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens, embeddings=None):  # tokens: [N, L] long, L <= context_length
        """embeddings [N, L, width]: used in place of token_embedding(tokens), e.g. with CoOp's learned
        context vectors (prompt_learners.py); the tokens still mark where each text ends (EOT)."""
        x = self.token_embedding(tokens) if embeddings is None else embeddings
        x = x + self.positional_embedding[: tokens.shape[1]]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in self.blocks:  # checkpoint restores the RNG state: adapter dropping recomputes alike
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        x = self.ln_final(x)  # [N, L, width]
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])


# ---------------------------------------------------------------------- CLIP
class ImageTower(VisionTransformer):
    """timm's ViT whose position embeddings follow the patch grid of any input as CAT-Seg's release resamples
    them (third_party/model_vpt.py, resized_pos_embed): the grid's embeddings resized bicubically
    (F.interpolate, align_corners=False) without antialiasing, the class token's kept. Switch:
    pos_embed_antialias = True resamples as timm's resample_abs_pos_embed does by default: antialiased bicubic,
    whose kernel (Keys' a = -0.5) differs from F.interpolate's (a = -0.75) even when enlarging."""

    pos_embed_antialias = False

    def _pos_embed(self, x):  # x [N, h, w, width] patch tokens -> [N, 1 + h*w, width], class token first
        N, h, w, width = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed,
            new_size=(h, w),
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=1,
            antialias=self.pos_embed_antialias,
        )  # [1, 1 + h*w, width]
        x = torch.cat([self.cls_token.expand(N, -1, -1), x.view(N, h * w, width)], dim=1)  # [N, 1 + h*w, width]
        return self.pos_drop(x + pos_embed)


def value_block(block, x):
    """CAT-Seg's dense last block (third_party/model_vpt.py, forward_dense): no attention; every token's value
    W_v LN1(x) + b_v through W_O, plus the class token's residual, then the MLP. x [N, L, width] -> [N, L, width]."""
    width = x.shape[-1]
    values = block.attn.qkv(block.norm1(x))[..., 2 * width :]  # [N, L, 3 width] -> the v block [N, L, width]
    x = x[:, :1] + block.ls1(block.attn.proj(block.attn.norm(values)))  # [N, 1, width] broadcast over L
    return x + block.ls2(block.mlp(block.norm2(x)))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        act_layer = QuickGELU if cfg.quick_gelu else nn.GELU
        self.visual = ImageTower(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.vision_width,
            depth=cfg.vision_layers,
            num_heads=cfg.vision_width // HEAD_WIDTH,
            mlp_ratio=4.0,
            pre_norm=True,
            global_pool="token",
            num_classes=cfg.embed_dim,
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
            act_layer=act_layer,
            dynamic_img_size=True,  # any input size: position embeddings resampled to the patch grid
        )
        self.visual.head = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text = TextTransformer(cfg, act_layer)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing in both towers: autograd keeps each block's input only and recomputes
        the block in backward, one more forward pass for far less activation memory."""
        self.visual.set_grad_checkpointing(enable)  # timm: checkpoint_seq over the blocks
        self.text.grad_checkpointing = enable
        return self

    def encode_image(self, images, normalize=False):  # [N, 3, H, W] -> [N, embed_dim]
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_dense(self, images, blocks=(), last_block="values"):
        """Every token's image feature, for any input size (a multiple of the patch size): the final norm and
        the projection applied to all tokens, [N, 1 + h*w, embed_dim], class token first; and the outputs of the
        image blocks numbered in `blocks` (0-indexed, before the last), each [N, width, h, w]. Switch:
        last_block = "values" runs the last block as CAT-Seg's release does (value_block); "attention" runs
        the plain block, so that token 0 is encode_image."""
        if last_block not in ("values", "attention"):
            raise ValueError(f"last_block {last_block!r}: expected values or attention")
        v = self.visual
        x = v.patch_embed(images)  # [N, h, w, width]
        h, w = x.shape[1:3]
        x = v.norm_pre(v.patch_drop(v._pos_embed(x)))  # [N, 1 + h*w, width]
        checkpointed = v.grad_checkpointing and self.training and torch.is_grad_enabled()
        features = []
        for i, block in enumerate(v.blocks):
            if i == len(v.blocks) - 1 and last_block == "values":
                x = value_block(block, x)
            else:
                x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            if i in blocks:
                features.append(x[:, 1:].transpose(1, 2).unflatten(2, (h, w)))  # [N, width, h*w] -> [N, width, h, w]
        return v.head(v.norm(x)), features

    def encode_text(self, tokens, normalize=False):  # [N, L] -> [N, embed_dim]
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens=None):
        """Normalised image and text features (None without tokens) and the scale s, as open_clip returns them.
        The image is encoded first, as in the released R-Adapter code: seeded adapter dropping draws in that order."""
        image = self.encode_image(images, True)
        text = None if tokens is None else self.encode_text(tokens, True)
        return image, text, self.logit_scale.exp()


# ---------------------------------------------------------- text and images
_tokenizer = None


def tokenize(texts, context_length=77) -> torch.LongTensor:
    """CLIP BPE (vocab 49,408) with SOT/EOT, zero padded; long texts are cut to
    context_length with EOT kept last. Ids equal open_clip's, whose vocabulary we use."""
    global _tokenizer
    if _tokenizer is None:
        from open_clip.tokenizer import SimpleTokenizer

        _tokenizer = SimpleTokenizer()
    return _tokenizer([texts] if isinstance(texts, str) else list(texts), context_length=context_length)


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(image_size, train=False, flip=False, scale=(0.9, 1.0)):
    """Eval: bicubic resize + center crop. Train: a bicubic RandomResizedCrop of `scale` (the crop's share of
    the image area): (0.9, 1) without flip is R-Adapter's recipe, (0.08, 1) with a random horizontal flip
    first Dassl's (CoOp, CoCoOp, CLIPFit)."""
    bicubic = transforms.InterpolationMode.BICUBIC
    geometry = (
        [transforms.RandomResizedCrop(image_size, scale=scale, interpolation=bicubic)]
        if train
        else [transforms.Resize(image_size, interpolation=bicubic), transforms.CenterCrop(image_size)]
    )
    flipped = [transforms.RandomHorizontalFlip()] if train and flip else []
    return transforms.Compose(
        [
            *flipped,
            *geometry,
            transforms.Lambda(_to_rgb),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
