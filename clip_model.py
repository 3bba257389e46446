"""CLIP, built from scratch (Radford et al., 2021), loading public weights.

This is the model both papers start from (PAPER.md section 1): an image
encoder f (a ViT) and a text encoder g (a causal transformer over BPE tokens,
pooled at the end-of-text token), each followed by a linear projection into a
shared embedding space. Logits are s * f(x) . g(t) on L2-normalised features,
with the learned scale s = exp(logit_scale) (100 for OpenAI weights).

  image tower : timm `VisionTransformer` configured as CLIP (pre-norm `ln_pre`,
                no patch-embedding bias, class token, final norm, bias-free
                projection head, QuickGELU for OpenAI weights). The toy world's
                preset swaps the patch projection for a small conv stem
                (`conv_stem`, through timm's HybridEmbed); everything else is CLIP.
  text tower  : `TextTransformer` below, handwritten. Its blocks use the same
                module names as timm's (`norm1`, `attn.qkv`, `attn.proj`,
                `norm2`, `mlp.fc1`, `mlp.fc2`), so both towers look alike to
                code that walks their blocks (r_adapter.py does).

Public API
  CLIPConfig, PRESETS          tiny config dataclass and named shapes
  CLIP                         .encode_image, .encode_text, .forward, .logit_scale
  load_clip(source)            file path (TorchScript / state dict / safetensors)
                               or hub name ('ViT-B-16', 'ViT-B-16:openai', ...)
  save_clip(model, path)       plain OpenAI-named state dict (open_clip loads it too,
                               except the toy preset, whose stem open_clip lacks)
  tokenize(texts)              CLIP BPE tokens, [N, context_length] long
  image_transform(size, train) PIL image -> normalised tensor
  config_from_state_dict(sd)   hyperparameters read off tensor shapes
  from_openai_state_dict / to_openai_state_dict   key-name conversion

Loading never runs code from a checkpoint: state dicts are read with
`torch.load(weights_only=True)` or safetensors, and an OpenAI TorchScript
archive is unpickled by a restricted reader that rebuilds tensors only (it
never compiles or runs the archive's TorchScript code).
"""
import io
import math
import os
import pickle
import re
import socket
import urllib.parse
import zipfile
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed, PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision import transforms

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # OpenAI's rule: heads = width // 64, in both towers
CACHE_DIR = Path(os.environ.get("RADAPTER_CACHE", Path.home() / ".cache" / "r-adapter"))


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
    conv_stem: tuple = ()    # toy preset only: channels of an early-convolution stem (see conv_stem)

    def __post_init__(self):  # a config read back from JSON metadata has conv_stem as a list
        object.__setattr__(self, "conv_stem", tuple(self.conv_stem))


PRESETS = {
    "ViT-B-32": CLIPConfig(patch_size=32),
    "ViT-B-16": CLIPConfig(),
    "ViT-L-14": CLIPConfig(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, text_width=768),
    # CPU-sized (tests, and open_clip's oracle): 32 px images in 4x4 patches of 8 px, a 4-layer image and a
    # 2-layer text tower, captions of up to 20 tokens, the real BPE vocabulary. About 0.13
    # GFLOP per image-caption pair for a training step (forward + backward).
    "tiny": CLIPConfig(embed_dim=128, image_size=32, patch_size=8, vision_width=128, vision_layers=4,
                       context_length=20, text_width=128, text_layers=2),
    # The toy world's CLIP (train.py --model toy): tiny with a conv stem in place of the 8 px patch
    # projection, so that a CPU-minutes pretraining learns shapes, not only colours.
    "toy": CLIPConfig(embed_dim=128, image_size=32, patch_size=8, vision_width=128, vision_layers=4,
                      context_length=20, text_width=128, text_layers=2, conv_stem=(32, 64, 128)),
}


def conv_stem(channels, in_chans=3):
    """Early convolutions for a small ViT (Xiao et al., NeurIPS 2021): per stage a 3x3 stride-2
    conv, GroupNorm and GELU; len(channels) stages downsample by 2 ** len(channels) (the patch size)."""
    layers = []
    for c_in, c_out in zip((in_chans, *channels), channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, c_out), nn.GELU()]
    return nn.Sequential(*layers)


def _stem_embed(channels, img_size, patch_size, in_chans, embed_dim, bias, **kwargs):
    """timm's embed_layer hook: the conv stem, then timm's HybridEmbed 1x1 projection to the width."""
    if patch_size != 2 ** len(channels):
        raise ValueError(f"conv_stem {channels} downsamples by {2 ** len(channels)}, not patch_size {patch_size}")
    return HybridEmbed(conv_stem(channels, in_chans), img_size=img_size, patch_size=1, in_chans=in_chans,
                       embed_dim=embed_dim, bias=bias, **kwargs)


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
        q, k, v = self.qkv(x).view(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N, heads, L, D/heads]
        return self.proj(x.transpose(1, 2).reshape(N, L, D))


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
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens):  # tokens: [N, L] long, L <= context_length
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.blocks(x))  # [N, L, width]
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])


# ---------------------------------------------------------------------- CLIP
class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        act_layer = QuickGELU if cfg.quick_gelu else nn.GELU
        self.visual = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width,
            depth=cfg.vision_layers, num_heads=cfg.vision_width // HEAD_WIDTH, mlp_ratio=4.0,
            pre_norm=True, global_pool="token", num_classes=cfg.embed_dim,
            norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer=act_layer,
            embed_layer=partial(_stem_embed, cfg.conv_stem) if cfg.conv_stem else PatchEmbed)
        self.visual.head = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text = TextTransformer(cfg, act_layer)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images, normalize=False):  # [N, 3, H, W] -> [N, embed_dim]
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):  # [N, L] -> [N, embed_dim]
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, tokens):
        """Normalised image and text features and the scale s, as open_clip returns them."""
        return self.encode_image(images, True), self.encode_text(tokens, True), self.logit_scale.exp()


# ------------------------------------------------- OpenAI key names <-> ours
# (OpenAI name, our name); a trailing '.' marks a prefix, otherwise a whole key.
_KEYS = [
    ("visual.conv1.weight", "visual.patch_embed.proj.weight"),
    ("visual.conv_stem.", "visual.patch_embed.backbone."),   # toy preset only (not an OpenAI key)
    ("visual.class_embedding", "visual.cls_token"),          # [w]     <-> [1, 1, w]
    ("visual.positional_embedding", "visual.pos_embed"),     # [n, w]  <-> [1, n, w]
    ("visual.ln_pre.", "visual.norm_pre."),
    ("visual.transformer.resblocks.", "visual.blocks."),
    ("visual.ln_post.", "visual.norm."),
    ("visual.proj", "visual.head.weight"),                   # [w, e]  <-> [e, w] (x @ proj)
    ("token_embedding.", "text.token_embedding."),
    ("positional_embedding", "text.positional_embedding"),
    ("transformer.resblocks.", "text.blocks."),
    ("ln_final.", "text.ln_final."),
    ("text_projection", "text.proj.weight"),                 # [w, e]  <-> [e, w]
    ("logit_scale", "logit_scale"),
]
_BLOCK_KEYS = [
    ("ln_1.", "norm1."), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."), ("ln_2.", "norm2."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
]
_TRANSPOSED = ("visual.proj", "text_projection")
# Non-parameter entries some checkpoints carry (OpenAI build_model drops the same).
_IGNORED = re.compile(r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask)$")


def _rename(key, table, reverse=False):
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def _key_to_ours(key):
    ours = _rename(key, _KEYS)
    if ours is not None and ".blocks." in ours:
        head, idx, rest = re.match(r"(.*\.blocks\.)(\d+\.)(.*)", ours).groups()
        rest = _rename(rest, _BLOCK_KEYS)
        ours = None if rest is None else head + idx + rest
    return ours


def from_openai_state_dict(state_dict, model: CLIP):
    """OpenAI/open_clip-named tensors -> our names and layouts, every shape checked."""
    expected = model.state_dict()
    out, unexpected = {}, []
    for key, value in state_dict.items():
        if _IGNORED.search(key):
            continue
        ours = _key_to_ours(key)
        if ours is None:
            unexpected.append(key)
            continue
        if key in _TRANSPOSED:
            value = value.t()
        if ours in expected and value.numel() == expected[ours].numel() and value.dim() < expected[ours].dim():
            value = value.reshape(expected[ours].shape)  # class / positional embeddings gain batch dims
        out[ours] = value
    missing = [k for k in expected if k not in out]
    unexpected += [k for k in out if k not in expected]
    if missing or unexpected:
        raise KeyError(f"state dict does not match {_describe(model.config)}: missing {_short(missing)}, "
                       f"unexpected {_short(unexpected)}")
    bad = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in out.items()
           if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"tensor shapes do not match {_describe(model.config)}: {_short(bad)}")
    return out


def to_openai_state_dict(model: CLIP):
    """Our model -> a plain OpenAI-named state dict (what OpenAI CLIP and open_clip load)."""
    out = {}
    for ours, value in model.state_dict().items():
        head = re.match(r"(visual|text)\.blocks\.(\d+)\.(.*)", ours)
        if head:
            tower, idx, rest = head.groups()
            key = _rename(f"{tower}.blocks.", _KEYS, reverse=True) + f"{idx}." + _rename(rest, _BLOCK_KEYS, True)
        else:
            key = _rename(ours, _KEYS, reverse=True)
        if key == "visual.class_embedding":
            value = value.reshape(-1)  # [1, 1, w] -> [w]
        if key == "visual.positional_embedding":
            value = value[0]  # [1, n, w] -> [n, w]
        if key in _TRANSPOSED:
            value = value.t()
        out[key] = value.contiguous()
    return out


def config_from_state_dict(state_dict, quick_gelu=True) -> CLIPConfig:
    """Read the hyperparameters off OpenAI-named tensor shapes (only .shape is used)."""
    required = ["visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
                "positional_embedding", "ln_final.weight", "text_projection"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not a CLIP ViT state dict (OpenAI/open_clip key names expected): missing {missing}; "
                       f"found keys like {_short(list(state_dict))}")

    def layers(prefix):
        return len({k.split(".")[len(prefix.split(".")) - 1] for k in state_dict if k.startswith(prefix)})

    conv = state_dict["visual.conv1.weight"].shape  # [width, 3, patch, patch] ([width, c, 1, 1] after a stem)
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    stem = [(int(k.split(".")[2]), v.shape[0]) for k, v in state_dict.items()
            if k.startswith("visual.conv_stem.") and len(v.shape) == 4]  # (index, out channels) per conv
    patch = conv[-1] * 2 ** len(stem)
    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1], image_size=patch * grid, patch_size=patch,
        vision_width=conv[0], vision_layers=layers("visual.transformer.resblocks."),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0], text_width=state_dict["ln_final.weight"].shape[0],
        text_layers=layers("transformer.resblocks."), quick_gelu=quick_gelu,
        conv_stem=tuple(c for _, c in sorted(stem)))


def _describe(cfg):
    name = next((n for n, p in PRESETS.items() if replace(p, quick_gelu=cfg.quick_gelu) == cfg), "custom")
    return f"{name} {asdict(cfg)}"


def _short(items, n=6):
    items = list(items)
    return "[]" if not items else ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ------------------------------------------------------------ reading files
class _ScriptObject:
    """Stand-in for a TorchScript module object: keeps its attributes, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Reads data.pkl of a TorchScript archive, rebuilding tensors and nothing else."""

    _DTYPES = {f"{n}Storage": getattr(torch, d) for n, d in [
        ("Float", "float32"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Double", "float64"),
        ("Long", "int64"), ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"),
        ("Bool", "bool")]}

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in self._DTYPES:
            return self._DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name.startswith("build_"):  # int/float/bool/tensor lists
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _untagged
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):  # ('storage', dtype, key, location, numel)
        _, dtype, key, _, numel = pid
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        storage = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return storage, dtype


def _untagged(value, type_tag):
    return value


def _rebuild_tensor(storage, offset, size, stride, *unused):
    untyped, dtype = storage
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


def _read_torchscript(archive: zipfile.ZipFile):
    pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
    root = _TensorsOnlyUnpickler(io.BytesIO(archive.read(pkl)), archive, pkl[: -len("data.pkl")]).load()
    tensors = {}

    def walk(obj, prefix):
        for name, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return tensors


def read_state_dict(path):
    """Tensors of a checkpoint file (no code runs), with OpenAI/open_clip key names.

    Returns (state_dict, metadata); metadata holds 'quick_gelu' when the file says it."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist()):
                    return _read_torchscript(archive), {"quick_gelu": "true", "format": "torchscript"}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read it as a CLIP checkpoint (truncated, or not a PyTorch/"
                         f"safetensors file?): {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


# ------------------------------------------------------------ public weights
def _resolve_name(name):
    """'ViT-B-16' or 'ViT-B-16:openai' -> a local file, downloading it once when online."""
    import open_clip

    arch, _, tag = name.partition(":")
    tag = tag or "openai"
    if arch not in PRESETS or arch in ("tiny", "toy"):
        raise FileNotFoundError(f"--model {name!r}: no such file, and not a known model name "
                                f"(use one of {[p for p in PRESETS if p not in ('tiny', 'toy')]}, optionally ':tag')")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(f"--model {name!r}: unknown pretrained tag {tag!r}; see open_clip.list_pretrained()")
    url = cfg.get("url") or f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}/resolve/main/open_clip_pytorch_model.bin"
    local = CACHE_DIR / (f"{arch}.pt" if tag == "openai" else f"{arch}-{tag}.bin")
    if local.exists():
        return local, cfg.get("quick_gelu", False)
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise RuntimeError(f"cannot download {name} (no network to {host}). Download\n  {url}\n"
                           f"and put it at\n  {local}\nor pass the file's path: --model PATH") from None
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_suffix(".part")
    torch.hub.download_url_to_file(url, str(tmp), progress=True)
    os.replace(tmp, local)
    return local, cfg.get("quick_gelu", False)


def load_clip(source, device="cpu", config=None, quick_gelu=None) -> CLIP:
    """Build our CLIP from public weights.

    source:     a checkpoint path (OpenAI TorchScript `.pt`, a state dict `.pt/.pth/.bin`
                with or without a 'state_dict' wrapper or 'module.' prefix, `.safetensors`)
                or a hub name ('ViT-B-16', 'ViT-B-16:openai', 'ViT-B-32:laion2b_s34b_b79k').
    config:     a preset name or CLIPConfig the file must match (error otherwise).
    quick_gelu: activation; default from the file's metadata or hub tag, else True (OpenAI).
    """
    path, hub_quick_gelu = Path(source), None
    if not path.exists():
        path, hub_quick_gelu = _resolve_name(str(source))
    state_dict, meta = read_state_dict(path)
    if quick_gelu is None:
        quick_gelu = meta["quick_gelu"] == "true" if "quick_gelu" in meta else (
            hub_quick_gelu if hub_quick_gelu is not None else True)
    try:
        cfg = config_from_state_dict(state_dict, quick_gelu)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    if config is not None:
        want = PRESETS[config] if isinstance(config, str) else config
        if replace(want, quick_gelu=quick_gelu) != cfg:
            raise ValueError(f"{path}: holds {_describe(cfg)}, expected {_describe(want)}")
    with torch.device("meta"):
        model = CLIP(cfg)
    try:
        model.load_state_dict(from_openai_state_dict(state_dict, model), assign=True)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    return model.float().to(device).eval()


def save_clip(model: CLIP, path):
    """Write a plain OpenAI-named CLIP (safetensors or torch), atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu() for k, v in to_openai_state_dict(model).items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(tmp), metadata={"quick_gelu": str(model.config.quick_gelu).lower()})
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)


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


def image_transform(image_size, train=False):
    """Eval: bicubic resize + center crop. Train: RandomResizedCrop(scale 0.9-1.0), no flip (paper 2.7)."""
    bicubic = transforms.InterpolationMode.BICUBIC
    geometry = ([transforms.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)] if train else
                [transforms.Resize(image_size, interpolation=bicubic), transforms.CenterCrop(image_size)])
    return transforms.Compose([*geometry, transforms.Lambda(_to_rgb), transforms.ToTensor(),
                               transforms.Normalize(CLIP_MEAN, CLIP_STD)])
