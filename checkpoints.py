"""Checkpoints: the training loop's (resume) and R-Adapter's adapter files (export, evaluate.py --adapters).

A training checkpoint (checkpoint.pt) holds the run's config, the CLIP architecture, the step, every
trainable tensor, the optimiser, the EMA and the GradScaler. It is written atomically
(clip_weights.atomic: a killed write leaves the previous file or the new one, never half of one), the one
before kept as <name>.prev.pt, which --resume latest falls back to when the latest is unreadable; a
checkpoint of another method, model, dataset, rank or architecture is refused.

An adapter file (adapters.safetensors) holds R-Adapter's W_adp and s of every adapter, and the EMA's
W~ under `ema.`, with the adapter config and the base CLIPConfig as JSON metadata; load_adapters attaches
them to a base CLIP of that architecture (the EMA weights by default: what the paper evaluates).
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

import r_adapter
import reparam
from clip_model import CLIPConfig
from clip_weights import WeightsError, atomic, cause, save_safetensors


# ------------------------------------------------------------ training checkpoints
def save_checkpoint(state, path):
    """Write `path` atomically, keeping the one before as <name>.prev.pt: a damaged write costs two intervals."""
    if path.exists():  # a second name for the current file, so that `path` never goes missing
        with atomic(path.with_suffix(".prev.pt")) as prev:
            prev.unlink(missing_ok=True)  # left by a run killed between the link and the rename
            os.link(path, prev)
    with atomic(path) as tmp, open(tmp, "wb") as f:  # via Python: a full disk is an OSError (not a RuntimeError)
        torch.save(state, f)


def read_checkpoint(path, latest):
    """The checkpoint at path; with --resume latest an unreadable one falls back to its .prev.pt."""
    candidates = [path, path.with_suffix(".prev.pt")] if latest else [path]
    for i, candidate in enumerate(candidates):
        if not candidate.exists():
            continue
        try:
            ckpt = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as e:  # torch reports a damaged file in many ways; it is named below either way
            if i + 1 < len(candidates) and candidates[i + 1].exists():
                print(f"--resume: {candidate} is unreadable ({type(e).__name__}); resuming from {candidates[i + 1]}")
                continue
            raise WeightsError(f"--resume: {candidate} is not a readable checkpoint ({cause(e)})") from None
        return ckpt, candidate
    raise WeightsError(f"--resume {'latest' if latest else path}: no checkpoint at {path}")


def restore(ckpt, path, config, model, ema, optimizer, scaler):
    """Load a checkpoint of the same run (config: this run's, as a dict) into the live objects; refuse
    one of another method, model, dataset, rank or architecture. Returns the checkpoint's step."""
    for key in ("method", "model", "data", "rank"):
        theirs, ours = ckpt["config"][key], config[key]
        if theirs != ours:
            raise WeightsError(f"--resume {path}: written by a run with --{key} {theirs}, this one has {ours}")
    if ckpt["clip_config"] != asdict(model.config):
        raise WeightsError(f"--resume {path}: written for another CLIP architecture than --model {config['model']}")
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, v in ckpt["trainable"].items():
            own[n].copy_(v)
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"]


# ------------------------------------------------------------------ adapter files
def save_adapters(model, path, ema=None):
    """Adapter (and EMA) tensors as safetensors; config and base CLIPConfig as JSON metadata."""
    path = Path(path)
    tensors = {n: p.cpu().contiguous() for n, p in r_adapter.adapter_state_dict(model).items()}
    if ema is not None:
        ema.live(model, "save_adapters")
        tensors.update({f"ema.{n}": w.cpu().contiguous() for n, w in ema.W_tilde.items()})
    info = dict(config=model.r_adapter_config, clip=asdict(model.config), ema_m=None if ema is None else ema.m)
    save_safetensors(tensors, path, metadata={"r_adapter": json.dumps(info)})


def _read(path):
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["r_adapter"])
            return path, info, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise WeightsError(
            f"{path}: not an R-Adapter file written by save_adapters ({type(e).__name__}: {e})"
        ) from None


def _copy_into(params, tensors, path):
    bad = sorted(set(params) ^ set(tensors)) + [
        n for n in params if n in tensors and params[n].shape != tensors[n].shape
    ]
    if bad:
        raise WeightsError(f"{path}: adapter tensors do not match the model: {bad[:6]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])


def load_adapters(model, path, use_ema=None):
    """Attach the adapters saved in path to a base CLIP (the same architecture it was trained on).
    use_ema: load the EMA weights W~ as the adapters (what the paper evaluates); None (default):
    when the file holds them. use_ema=False (+ load_ema) resumes training from the live weights."""
    path, info, tensors = _read(path)
    if CLIPConfig(**info["clip"]) != model.config:
        raise WeightsError(
            f"{path}: adapters were trained on CLIP {info['clip']}, the base model is {asdict(model.config)}"
        )
    if use_ema is None:
        use_ema = info["ema_m"] is not None
    if use_ema and info["ema_m"] is None:
        raise WeightsError(f"{path}: holds no EMA weights (saved without ema=)")
    r_adapter.add_adapters(model, **info["config"])
    prefix = "ema." if use_ema else ""
    _copy_into(
        dict(r_adapter.adapter_parameters(model)),
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith("ema.") == use_ema},
        path,
    )
    return model


def load_ema(model, path):
    """The reparam.EMA saved in path, for a model carrying the same adapters (e.g. from load_adapters)."""
    path, info, tensors = _read(path)
    if info["ema_m"] is None:
        raise WeightsError(f"{path}: holds no EMA weights (saved without ema=)")
    ema = reparam.EMA(model, info["ema_m"])
    _copy_into(ema.W_tilde, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, path)
    return ema
