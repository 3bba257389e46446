"""Public CLIP weights: OpenAI and open_clip checkpoints in, plain CLIP files out (clip_model.CLIP).

Every format ships OpenAI's key names (`visual.transformer.resblocks.N.attn.in_proj_weight`, ...);
`_KEYS` maps them onto ours (timm's for the image tower), and the hyperparameters are read off the
tensor shapes. Formats: OpenAI's TorchScript archives (`ViT-B-16.pt`), open_clip / hub state dicts
(`.bin`, `.pt`, `.pth`, with or without a `state_dict` wrapper or `module.` prefix) and safetensors.
Loading never runs code from a checkpoint (weight_files.py).
`load_clip` is the one model resolver of every entry point: `toy` (the shipped toy CLIP, checked
against its published SHA-256), a file, or a hub name ('ViT-B-16', 'ViT-B-16:laion2b_s34b_b88k'),
which downloads once to ~/.cache/r-adapter ($RADAPTER_CACHE); offline it fails at once with the
URL and the path to put the file at.
"""

import hashlib
import os
import re
import socket
import urllib.parse
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from pathlib import Path

import torch

from clip_model import CLIP, PRESETS, CLIPConfig
from weight_files import WeightsError, cause, read_state_dict  # noqa: F401 (WeightsError, cause: re-exported)

CACHE_DIR = Path(os.environ.get("RADAPTER_CACHE", Path.home() / ".cache" / "r-adapter"))
TOY_CLIP = Path(__file__).resolve().parent / "assets" / "toy-clip.safetensors"  # toy_clip.py pretrains it
TOY_CLIP_SHA256 = "2080ff1a5fc7c79bc6d5497f5c1359ac3e278b3cc21bdf31316f123cf19b1377"


@contextmanager
def atomic(path):
    """Write to <path>.tmp inside the block, then move it over `path` in one step: a crash or an
    interrupt leaves the old file or the new one, never half of one. A block that fails (a full disk,
    a read-only folder) removes the .tmp and raises OSError(errno, strerror, path)."""
    tmp = Path(f"{path}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def save_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file, atomically. Serialised in memory and written by Python, so
    that a failed write raises OSError (safetensors' save_file raises its own error, without the path)."""
    from safetensors.torch import save

    with atomic(path) as tmp:
        tmp.write_bytes(save(tensors, metadata))


# ------------------------------------------------- OpenAI key names <-> ours
# (OpenAI name, our name); a trailing '.' marks a prefix, otherwise a whole key.
_KEYS = [
    ("visual.conv1.weight", "visual.patch_embed.proj.weight"),
    ("visual.class_embedding", "visual.cls_token"),  # [w]     <-> [1, 1, w]
    ("visual.positional_embedding", "visual.pos_embed"),  # [n, w]  <-> [1, n, w]
    ("visual.ln_pre.", "visual.norm_pre."),
    ("visual.transformer.resblocks.", "visual.blocks."),
    ("visual.ln_post.", "visual.norm."),
    ("visual.proj", "visual.head.weight"),  # [w, e]  <-> [e, w] (x @ proj)
    ("token_embedding.", "text.token_embedding."),
    ("positional_embedding", "text.positional_embedding"),
    ("transformer.resblocks.", "text.blocks."),
    ("ln_final.", "text.ln_final."),
    ("text_projection", "text.proj.weight"),  # [w, e]  <-> [e, w]
    ("logit_scale", "logit_scale"),
]
_BLOCK_KEYS = [
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
]
_TRANSPOSED = ("visual.proj", "text_projection")
# Non-parameter entries some checkpoints carry (OpenAI build_model drops the same).
_IGNORED = re.compile(r"(^|\.)(input_resolution|context_length|vocab_size|attn_mask)$")


def _rename(key, table, reverse=False):
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
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
        raise KeyError(
            f"state dict does not match {_describe(model.config)}: missing {_short(missing)}, "
            f"unexpected {_short(unexpected)}"
        )
    bad = [
        f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in out.items() if v.shape != expected[k].shape
    ]
    if bad:
        raise ValueError(f"tensor shapes do not match {_describe(model.config)}: {_short(bad)}")
    return out


def to_openai_state_dict(model: CLIP):
    """Our model -> a plain OpenAI-named state dict (what OpenAI CLIP and open_clip load)."""
    out = {}
    for ours, value in model.state_dict().items():
        if ours.split(".")[0] not in ("visual", "text", "logit_scale"):
            continue  # not CLIP: a classification head or prompt learner, saved apart (train.export)
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
    required = [
        "visual.conv1.weight",
        "visual.positional_embedding",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "text_projection",
    ]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(
            f"not a CLIP ViT state dict (OpenAI/open_clip key names expected): missing {missing}; "
            f"found keys like {_short(list(state_dict))}"
        )

    def layers(prefix):
        return len({k.split(".")[len(prefix.split(".")) - 1] for k in state_dict if k.startswith(prefix)})

    conv = state_dict["visual.conv1.weight"].shape  # [width, 3, patch, patch]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    patch = conv[-1]
    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        image_size=patch * grid,
        patch_size=patch,
        vision_width=conv[0],
        vision_layers=layers("visual.transformer.resblocks."),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_width=state_dict["ln_final.weight"].shape[0],
        text_layers=layers("transformer.resblocks."),
        quick_gelu=quick_gelu,
    )


def _describe(cfg):
    name = next((n for n, p in PRESETS.items() if replace(p, quick_gelu=cfg.quick_gelu) == cfg), "custom")
    return f"{name} {asdict(cfg)}"


def _short(items, n=6):
    items = list(items)
    return (
        "[]"
        if not items
        else ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")
    )


# ------------------------------------------------------------ public weights
def _resolve_name(name):
    """'ViT-B-16' or 'ViT-B-16:openai' -> a local file, downloading it once when online."""
    import open_clip

    arch, _, tag = name.partition(":")
    tag = tag or "openai"
    if arch not in PRESETS or arch in ("tiny", "toy"):
        hub = [p for p in PRESETS if p not in ("tiny", "toy")]
        raise WeightsError(f"--model {name!r}: no such file, and not a known model name (toy, or one of {hub}[:tag])")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise WeightsError(f"--model {name!r}: unknown pretrained tag {tag!r}; see open_clip.list_pretrained()")
    url = (
        cfg.get("url") or f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}/resolve/main/open_clip_pytorch_model.bin"
    )
    local = CACHE_DIR / (f"{arch}.pt" if tag == "openai" else f"{arch}-{tag}.bin")
    if local.exists():
        return local, cfg.get("quick_gelu", False)
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise WeightsError(
            f"--model {name}: cannot download {url} (no network to {host}); "
            f"download it to {local}, or pass the file's path: --model PATH"
        ) from None
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_suffix(".part")
    torch.hub.download_url_to_file(url, str(tmp), progress=True)
    os.replace(tmp, local)
    return local, cfg.get("quick_gelu", False)


def load_clip(source, device="cpu", config=None, quick_gelu=None) -> CLIP:
    """Build our CLIP from public weights.

    source:     'toy' (the shipped toy CLIP, load_toy_clip), a checkpoint path (OpenAI TorchScript `.pt`,
                a state dict `.pt/.pth/.bin` with or without a 'state_dict' wrapper or 'module.' prefix,
                `.safetensors`) or a hub name ('ViT-B-16', 'ViT-B-16:openai', 'ViT-B-32:laion2b_s34b_b79k').
    config:     a preset name or CLIPConfig the file must match (error otherwise).
    quick_gelu: activation; default from the file's metadata or hub tag, else True (OpenAI).
    """
    if str(source) == "toy":
        return load_toy_clip(device)
    path, hub_quick_gelu = Path(source), None
    if not path.exists():
        path, hub_quick_gelu = _resolve_name(str(source))
    state_dict, meta = read_state_dict(path)
    if quick_gelu is None:
        quick_gelu = (
            meta["quick_gelu"] == "true"
            if "quick_gelu" in meta
            else (hub_quick_gelu if hub_quick_gelu is not None else True)
        )
    try:
        cfg = config_from_state_dict(state_dict, quick_gelu)
    except KeyError as e:
        raise WeightsError(f"{path}: {e.args[0]}") from None
    if config is not None:
        want = PRESETS[config] if isinstance(config, str) else config
        if replace(want, quick_gelu=quick_gelu) != cfg:
            raise WeightsError(f"{path}: holds {_describe(cfg)}, expected {_describe(want)}")
    with torch.device("meta"):
        model = CLIP(cfg)
    try:
        model.load_state_dict(from_openai_state_dict(state_dict, model), assign=True)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: {e.args[0]}") from None
    return model.float().to(device).eval()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_toy_clip(device="cpu", path=TOY_CLIP, digest=TOY_CLIP_SHA256):
    """The shipped toy CLIP, after checking that its bytes are the published ones."""
    if not path.exists():
        raise WeightsError(
            f"{path}: the toy CLIP is missing; restore it with `git checkout -- {path.name}` "
            f"in {path.parent}, or rebuild it with `python toy_clip.py` and pass --model PATH"
        )
    found = sha256(path)
    if found != digest:
        raise WeightsError(
            f"{path}: SHA-256 {found[:16]}..., expected {digest[:16]}...: the file is damaged or "
            "was replaced; restore it with git, or pass a rebuilt one with --model PATH"
        )
    return load_clip(path, device=device)


def save_clip(model: CLIP, path, dtype=None):
    """Write a plain OpenAI-named CLIP (safetensors or torch), atomically; `dtype` casts the tensors."""
    path = Path(path)
    tensors = {k: v.detach().cpu().to(dtype or v.dtype) for k, v in to_openai_state_dict(model).items()}
    if path.suffix == ".safetensors":
        return save_safetensors(tensors, path, metadata={"quick_gelu": str(model.config.quick_gelu).lower()})
    with atomic(path) as tmp, open(tmp, "wb") as f:  # via Python: a full disk is an OSError (not a RuntimeError)
        torch.save(tensors, f)
