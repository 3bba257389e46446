"""Public CLIP weights: OpenAI and open_clip checkpoints in, plain CLIP files out (clip_model.CLIP).

Every format ships OpenAI's key names (`visual.transformer.resblocks.N.attn.in_proj_weight`, ...);
`_KEYS` maps them onto ours (timm's for the image tower), and the hyperparameters are read off the
tensor shapes. Formats: OpenAI's TorchScript archives (`ViT-B-16.pt`), open_clip / hub state dicts
(`.bin`, `.pt`, `.pth`, with or without a `state_dict` wrapper or `module.` prefix) and safetensors.
Loading never runs code from a checkpoint: state dicts are read with `torch.load(weights_only=True)`
or safetensors, and a TorchScript archive by an unpickler that rebuilds tensors and nothing else.
`load_clip` is the one model resolver of every entry point: `toy` (the shipped toy CLIP, checked
against its published SHA-256), a file, or a hub name ('ViT-B-16', 'ViT-B-16:laion2b_s34b_b88k'),
which downloads once to ~/.cache/r-adapter ($RADAPTER_CACHE); offline it fails at once with the
URL and the path to put the file at.
"""

import hashlib
import io
import os
import pickle
import re
import socket
import urllib.parse
import zipfile
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from pathlib import Path

import torch

from clip_model import CLIP, PRESETS, CLIPConfig

CACHE_DIR = Path(os.environ.get("RADAPTER_CACHE", Path.home() / ".cache" / "r-adapter"))
TOY_CLIP = Path(__file__).resolve().parent / "assets" / "toy-clip.safetensors"  # toy_experiments.py pretrains it
TOY_CLIP_SHA256 = "136ebeb6647eff562301e8338a9ecbc3afb2d91b7f8c71296ae164479ea59cd0"


class WeightsError(ValueError):
    """A weights, adapter or checkpoint file that is not what was expected; the message names it."""


def cause(e):
    """'Type: first clause' of an exception, for a one-line message: torch explains a damaged file over
    many lines, and its advice to load with weights_only=False would run the file's code."""
    first = re.split(r"\.\s|\n", str(e).strip(), maxsplit=1)[0].rstrip(".")
    return f"{type(e).__name__}: {first}" if first and "weights_only" not in first else type(e).__name__


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


# ------------------------------------------------------------ reading files
class _ScriptObject:
    """Stand-in for a TorchScript module object: keeps its attributes, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Reads data.pkl of a TorchScript archive, rebuilding tensors and nothing else."""

    _DTYPES = {
        f"{n}Storage": getattr(torch, d)
        for n, d in [
            ("Float", "float32"),
            ("Half", "float16"),
            ("BFloat16", "bfloat16"),
            ("Double", "float64"),
            ("Long", "int64"),
            ("Int", "int32"),
            ("Short", "int16"),
            ("Char", "int8"),
            ("Byte", "uint8"),
            ("Bool", "bool"),
        ]
    }

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


class _Inert:
    """Stands in for any object of a pickle other than tensors and plain containers: keeps nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _InertUnpickler(pickle.Unpickler):
    """torch.load's unpickler for read_inert: tensors are rebuilt (torch.load supplies their storages), every
    other class or function the pickle names is _Inert."""

    _REBUILD = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter")}

    def find_class(self, module, name):
        if (module, name) in self._REBUILD:
            return getattr(torch._utils, name)
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Inert


def read_inert(path):
    """A torch.save'd file whose pickle holds objects besides tensors (a Dassl checkpoint pickles its
    scheduler, so torch.load(weights_only=True) refuses it): its tensors and containers, every other object
    an inert stand-in; no code of the file runs."""
    load = lambda f, **kw: _InertUnpickler(f, **kw).load()
    inert = type("inert", (), {"__name__": "inert", "Unpickler": _InertUnpickler, "load": staticmethod(load)})
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=inert)


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
        raise WeightsError(
            f"{path}: cannot read it as a CLIP checkpoint (truncated, or not a PyTorch/safetensors file?): {cause(e)}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


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
            f"in {path.parent}, or rebuild it with `python toy_experiments.py` and pass --model PATH"
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
