"""Re-parameterisable fine-tuning: one merge contract for R-Adapter, LoRA and SSF, and their EMA.

Each method wraps some nn.Linear / nn.LayerNorm layers of both towers (its one wrapping rule lives
in its own file: r_adapter.py, baselines.py, ssf.py) in a layer that shares the layer's W_org and
b_org and adds the method's own parameters. A wrapper's fold(alpha) gives, in fp32, the weight and
bias of the one plain layer that computes the same function with the method's update times alpha:

    R-Adapter (Kim et al., ECCV 2024, Sec. 3.3)  W_rep = W_org + alpha M W_org      b_rep = b_org + alpha M b_org
    LoRA (Hu et al., ICLR 2022)                  W_rep = W_org + alpha s B A        b_rep = b_org
    SSF (Lian et al., NeurIPS 2022)              W_rep = W_org + alpha (gamma - 1) W_org (per output row)
                                                 b_rep = b_org + alpha ((gamma - 1) b_org + beta)

Each fold is affine in alpha, so merge(model, alpha) is WiSE-FT's theta_zs + alpha (theta_ft - theta_zs)
between zero-shot CLIP (alpha 0, bit for bit) and the merged fine-tuned model (alpha 1). For
R-Adapter that is the paper's re-scaling (alpha 0.5 for classification, 0.8 for retrieval); for
LoRA and SSF, whose papers evaluate the fine-tuned model (alpha 1), it is a WiSE-style scaling of
their update. An alpha sweep needs no retraining.

merge() requires eval mode, folds every wrapper (with the EMA weights swapped in, when given) in
fp32, casts once and puts plain layers in their place: the model is then a plain CLIP (same
parameters and FLOPs; save_clip writes it and open_clip loads it), and training it is refused.
unmerge() puts the wrappers back, bit for bit (kept, never inverted).
"""

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from clip_weights import save_clip

TOWERS = ("visual", "text")


class Foldable:
    """Mixin of a wrapper layer (a subclass of nn.Linear or nn.LayerNorm sharing the weight and bias
    of the layer it wraps): fold(alpha) -> (weight, bias), fp32, of the plain layer it merges into."""

    def fold(self, alpha):
        raise NotImplementedError


def foldables(model):
    """[(name, wrapper)] of every Foldable layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Foldable)]


def is_merged(model):
    return getattr(model, "_reparam_merged", None) is not None


def require_unmerged(model, action):
    if is_merged(model):
        raise RuntimeError(f"{action}: the model is merged (reparam.merge); call reparam.unmerge(model) first")


def wrap(model, sites, make):
    """A method's wrapping rule applied: freeze `model`, then replace each layer (parent, name) of
    `sites`, a plain nn.Linear or nn.LayerNorm, by make(layer), whose own parameters train."""
    require_unmerged(model, "wrap")
    sites = list(sites)
    for parent, name in sites:  # all checked before anything changes
        if type(getattr(parent, name)) not in (nn.Linear, nn.LayerNorm):
            raise TypeError(
                f"{name}: expected a plain nn.Linear or nn.LayerNorm, found {type(getattr(parent, name)).__name__} "
                "(one re-parameterisable method per model)"
            )
    model.requires_grad_(False)
    for parent, name in sites:
        layer = getattr(parent, name)
        setattr(parent, name, make(layer).train(layer.training))
    return model


# ------------------------------------------------------------------ the EMA
class EMA:
    """Temporal ensemble (R-Adapter Sec. 3.3): W~ <- m W~ + (1 - m) W after every optimiser step, in
    fp32, from the initial values, over every parameter that trains (whichever method set it up)."""

    def __init__(self, model, m=0.999):
        require_unmerged(model, "EMA")
        if not 0 <= m <= 1:
            raise ValueError(f"EMA momentum m must be in [0, 1], got {m}")
        self.m = m
        self.W_tilde = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        if not self.W_tilde:
            raise ValueError("EMA: the model has no trainable parameters")

    def live(self, model, action="EMA"):
        """{name: Parameter} of the model for each EMA weight; refuses a merged or different model."""
        require_unmerged(model, action)
        params = dict(model.named_parameters())
        if any(n not in params or params[n].shape != w.shape for n, w in self.W_tilde.items()):
            raise ValueError(f"{action}: the model's trainable parameters do not match this EMA")
        return {n: params[n] for n in self.W_tilde}

    @torch.no_grad()
    def update(self, model):
        """Call after every optimiser step: W~ <- m W~ + (1 - m) W."""
        for n, W in self.live(model, "EMA.update").items():
            self.W_tilde[n].mul_(self.m).add_((1 - self.m) * W.float())

    @contextmanager
    def applied(self, model):
        """The EMA weights in the live parameters for the duration (the live ones restored exactly)."""
        params = self.live(model, "EMA.applied")
        kept = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.W_tilde[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(kept[n])

    def state_dict(self):
        return {"m": self.m, "W_tilde": {n: w.clone() for n, w in self.W_tilde.items()}}

    def load_state_dict(self, state):
        if state["W_tilde"].keys() != self.W_tilde.keys():
            raise ValueError("EMA state does not match the model's trainable parameters")
        self.m = state["m"]
        for n, w in state["W_tilde"].items():
            self.W_tilde[n].copy_(w)


# ------------------------------------------------------------------- merging
def _plain(layer, weight, bias):
    """A frozen plain nn.Linear or nn.LayerNorm shaped like `layer`, holding weight and bias (fp32 in,
    cast once to the layer's dtype)."""
    if isinstance(layer, nn.LayerNorm):
        plain = nn.LayerNorm(layer.normalized_shape, eps=layer.eps, device="meta")
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    dtype = layer.weight.dtype
    plain.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    plain.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
    return plain.train(False)


def _refuse_training(tower, args):
    if tower.training:
        raise RuntimeError(
            "this CLIP is merged (reparam.merge) and is for evaluation only: "
            "call reparam.unmerge(model) before training, or model.eval()"
        )


@torch.no_grad()
def merge(model, alpha, ema=None):
    """Fold every wrapper, its update times alpha (the EMA weights when given), into a plain layer:
    the model becomes a plain CLIP. Requires model.eval(); undo with unmerge(model)."""
    require_unmerged(model, "merge")
    if model.training:
        raise RuntimeError("merge is for evaluation: call model.eval() first (and unmerge before training)")
    layers = foldables(model)
    if not layers:
        raise RuntimeError("merge: the model has no re-parameterisable layers (add_adapters, add_lora or add_ssf)")
    originals = []
    with ema.applied(model) if ema is not None else nullcontext():
        for name, layer in layers:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            weight, bias = layer.fold(alpha)
            setattr(parent, attr, _plain(layer, weight, bias))
            originals.append((parent, attr, layer))
    hooks = [getattr(model, t).register_forward_pre_hook(_refuse_training) for t in TOWERS]
    model._reparam_merged = dict(alpha=alpha, originals=originals, hooks=hooks)  # not in the module tree
    return model


def unmerge(model):
    """Put the wrappers (and with them the original weights, bit for bit) back."""
    state = getattr(model, "_reparam_merged", None)
    if state is None:
        raise RuntimeError("unmerge: the model is not merged")
    for hook in state["hooks"]:
        hook.remove()
    for parent, attr, layer in state["originals"]:
        setattr(parent, attr, layer.to(getattr(parent, attr).weight.device))
    model._reparam_merged = None
    return model


@contextmanager
def merged(model, alpha, ema=None):
    """The merged model inside the block (model.eval(), merge); then unmerge and restore the mode."""
    require_unmerged(model, "merged")
    training = model.training
    merge(model.eval(), alpha, ema)
    try:
        yield model
    finally:
        unmerge(model).train(training)


def export_merged(model, path, alpha, ema=None):
    """Write the merged model as a plain OpenAI-named CLIP (clip_weights.load_clip and open_clip read
    it); the model itself is left unmerged, in its train/eval mode."""
    with merged(model, alpha, ema):
        save_clip(model, path)
