"""R-Adapter (Kim, Jeong, Kim, Kwak, ECCV 2024, Sec. 3.3): adapters, dropping, EMA, re-scaling, merge.

Adapter. A linear, bias-free, residual module h(X) = X + s X W_adp (row vectors, X: tokens x d),
after the attention output projection W_O (`attn.proj`) and after the FFN's W_2 (`mlp.fc2`) of every
block of both towers, before the residual addition. Full rank: W_adp is d x d (ViT-B/16: 20,447,232
weights + 48 scales s). Low rank: W_adp = (B A)^T, A: r x d random, B: d x r zero. W_adp starts at
zero, so a fresh model is zero-shot CLIP bit for bit; s is learnable (init 0.1, as released).
Everything else is frozen, the logit scale included.

Re-parameterisation. As a Linear weight the adapter is M = s W_adp^T, h(y) = y + y M^T, so the pair
folds into one Linear: W_rep = (I + M) W_org, b_rep = (I + M) b_org. merge() does this in fp32 and
casts once; the merged model is a plain CLIP (no extra parameters or FLOPs); unmerge() puts back
the kept original weights (bit exact, never inverted). Training while merged is refused.

Dynamic ensemble (adapter dropping): in training each branch is kept with probability 1 - p and
scaled by 1 / (1 - p); one draw per sample and adapter (the paper's sub-networks, drop_mode
'sample') or per token position shared by the batch ('token', the released code's timm DropPath).
Temporal ensemble: W~ <- m W~ + (1 - m) W after every step (AdapterEMA), from the initial values.
Weight-space ensemble (re-scaling): W_ens = (I + alpha M~) W_org; alpha 0 is zero-shot CLIP, 1 the
fine-tuned model (paper: 0.5 classification, 0.8 retrieval), so an alpha sweep needs no retraining.

Where the released code (github.com/tjddus9597/R-Adapter-ECCV2024) differs: per-token dropping
(drop_mode='token'); its low-rank branch is unreachable, since building and merging test opposite
rank conditions (github.com/tjddus9597/R-Adapter-ECCV2024/issues/1), while ours runs both; its
merged evaluation hard-wires alpha = 0.5.
"""

import json
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from clip_model import CLIPConfig, count_trainable
from clip_weights import WeightsError, save_clip, save_safetensors

TOWERS = ("visual", "text")
DROP_MODES = ("sample", "token")


class Adapter(nn.Module):
    """The branch of h(y) = y + s y W_adp: linear, bias-free, zero-initialised."""

    def __init__(self, d, rank=None, learn_scale=True, drop_p=0.2, drop_mode="sample", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.rank, self.drop_p, self.drop_mode = rank, drop_p, drop_mode
        self.alpha = 1.0  # re-scaling; not 1 only inside rescaled()/merge()
        if rank is None:
            self.W_adp = nn.Parameter(torch.zeros(d, d, **kw))  # [d_in, d_out], paper's row convention
        else:
            self.A = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, d, **kw)))  # [r, d] down
            self.B = nn.Parameter(torch.zeros(d, rank, **kw))  # [d, r] up
        self.register_parameter("s", nn.Parameter(torch.tensor(0.1, **kw)) if learn_scale else None)

    def forward(self, y):  # y: [N, L, d] -> alpha s y W_adp, dropped in training
        z = y @ self.W_adp if self.rank is None else F.linear(F.linear(y, self.A), self.B)
        gain = self.alpha if self.s is None else self.alpha * self.s  # scalar
        if self.training and self.drop_p > 0:
            shape = (len(z),) + (1,) * (z.dim() - 1) if self.drop_mode == "sample" else (1, *z.shape[1:-1], 1)
            gain = gain * z.new_empty(shape).bernoulli_(1 - self.drop_p) / (1 - self.drop_p)
        return z * gain

    def linear_weight(self):
        """alpha M = alpha s W_adp^T, the branch as a [d_out, d_in] Linear weight, fp32."""
        M = self.W_adp.float().T if self.rank is None else self.B.float() @ self.A.float()
        return M * (self.alpha if self.s is None else self.alpha * self.s.float())

    def extra_repr(self):
        return f"rank={self.rank or 'full'}, drop_p={self.drop_p}, drop_mode={self.drop_mode}"


class AdaptedLinear(nn.Linear):
    """y = x W^T + b followed by its adapter: h(y) = y + adapter(y). Shares W and b with the
    nn.Linear it replaces, so state-dict keys of the base model are unchanged."""

    def __init__(self, linear: nn.Linear, adapter: Adapter):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.adapter = adapter

    def forward(self, x):  # x: [N, L, d_in] -> [N, L, d_out]
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter(y)


# ------------------------------------------------------------------ attaching
def _sites(model):
    """(tower, parent, name) of every adapted Linear: W_O and W_2 of each block of both towers."""
    for tower in TOWERS:
        for block in getattr(model, tower).blocks:
            yield tower, block.attn, "proj"
            yield tower, block.mlp, "fc2"


def is_merged(model):
    return getattr(model, "_r_adapter_merged", None) is not None


def _require_unmerged(model, action):
    if is_merged(model):
        raise RuntimeError(
            f"{action}: the adapters are merged into the weights (r_adapter.merge); call r_adapter.unmerge(model) first"
        )


def _adapted(model):
    """[(name, AdaptedLinear)] in module order; the model must carry unmerged adapters."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    if not layers:
        raise RuntimeError("the model has no adapters: call r_adapter.add_adapters or load_adapters first")
    return layers


def add_adapters(model, rank=None, drop_p=0.2, drop_mode="sample", learn_scale=True):
    """Attach the 4 * layers adapters of R-Adapter and freeze everything else (logit scale too)."""
    _require_unmerged(model, "add_adapters")
    if getattr(model, "r_adapter_config", None) is not None:
        raise RuntimeError(f"the model already has adapters {model.r_adapter_config}")
    ranks = dict(rank) if isinstance(rank, dict) else dict.fromkeys(TOWERS, rank)
    if set(ranks) != set(TOWERS) or not all(r is None or (isinstance(r, int) and r >= 1) for r in ranks.values()):
        raise ValueError(f"rank must be None (full), an int >= 1 or {{'visual': r, 'text': r}}, got {rank!r}")
    if not 0 <= drop_p < 1 or drop_mode not in DROP_MODES:
        raise ValueError(f"need 0 <= drop_p < 1 and drop_mode in {DROP_MODES}, got {drop_p}, {drop_mode!r}")
    model.requires_grad_(False)
    for tower, parent, name in _sites(model):
        linear = getattr(parent, name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{tower} {name}: expected nn.Linear, found {type(linear).__name__}")
        adapter = Adapter(
            linear.out_features,
            ranks[tower],
            learn_scale,
            drop_p,
            drop_mode,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        setattr(parent, name, AdaptedLinear(linear, adapter).train(linear.training))
    model.r_adapter_config = dict(rank=ranks, drop_p=drop_p, drop_mode=drop_mode, learn_scale=learn_scale)
    return model


def adapter_parameters(model, action="adapter_parameters"):
    """[(name, Parameter)] of every adapter, e.g. 'visual.blocks.0.attn.proj.adapter.W_adp'."""
    _require_unmerged(model, action)
    return [(f"{n}.adapter.{k}", p) for n, m in _adapted(model) for k, p in m.adapter.named_parameters()]


def adapter_state_dict(model):
    return {n: p.detach() for n, p in adapter_parameters(model, "adapter_state_dict")}


def summary(model):
    """One line: adapter weights, scales, trainable and total parameter counts."""
    params = adapter_parameters(model, "summary")
    scales = sum(p.numel() for n, p in params if n.endswith(".s"))
    weights = sum(p.numel() for _, p in params) - scales
    total = sum(p.numel() for p in model.parameters())
    return (
        f"R-Adapter {model.r_adapter_config}: {len(_adapted(model))} adapters, W_adp {weights:,} + s {scales:,} "
        f"= {weights + scales:,} adapter parameters; trainable {count_trainable(model):,} of {total:,}"
    )


# ----------------------------------------------------------- EMA and alpha
class AdapterEMA:
    """Temporal ensemble: W~ <- m W~ + (1 - m) W over all adapter parameters, s included (fp32)."""

    def __init__(self, model, m=0.999):
        if not 0 <= m <= 1:
            raise ValueError(f"EMA momentum m must be in [0, 1], got {m}")
        self.m = m
        self.shadow = {n: p.detach().float().clone() for n, p in adapter_parameters(model, "AdapterEMA")}

    def _live(self, model, action):
        params = dict(adapter_parameters(model, action))
        if params.keys() != self.shadow.keys() or any(params[n].shape != w.shape for n, w in self.shadow.items()):
            raise ValueError(f"{action}: the model's adapters do not match this EMA")
        return params

    @torch.no_grad()
    def update(self, model):
        """Call after every optimiser step."""
        for n, p in self._live(model, "AdapterEMA.update").items():
            self.shadow[n].mul_(self.m).add_(p.float(), alpha=1 - self.m)

    @contextmanager
    def applied(self, model):
        """Swap the EMA weights into the live adapters for the duration (restored exactly)."""
        params = self._live(model, "AdapterEMA.applied")
        live = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])

    def state_dict(self):
        return {"m": self.m, "shadow": {n: w.clone() for n, w in self.shadow.items()}}

    def load_state_dict(self, state):
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the model's adapters")
        self.m = state["m"]
        for n, w in state["shadow"].items():
            self.shadow[n].copy_(w)


@contextmanager
def rescaled(model, alpha=0.5, ema=None):
    """Evaluate W_ens = (I + alpha M~) W_org without merging: each branch times alpha, EMA weights
    swapped in when given. Numerically the unmerged twin of merge(model, alpha, ema)."""
    _require_unmerged(model, "rescaled")
    adapters = [m.adapter for _, m in _adapted(model)]
    with ema.applied(model) if ema is not None else nullcontext():
        for a in adapters:
            a.alpha = alpha
        try:
            yield model
        finally:
            for a in adapters:
                a.alpha = 1.0


# ------------------------------------------------------------------- merging
def _refuse_training(tower, args):
    if tower.training:
        raise RuntimeError(
            "this CLIP has its adapters merged (r_adapter.merge) and is for evaluation only: "
            "call r_adapter.unmerge(model) before training, or model.eval()"
        )


@torch.no_grad()
def merge(model, alpha=0.5, ema=None):
    """Fold the (EMA) adapters, scaled by alpha, into the preceding Linear layers: the model
    becomes a plain CLIP computing W_ens. Requires model.eval(); undo with unmerge(model)."""
    _require_unmerged(model, "merge")
    if model.training:
        raise RuntimeError("merge is for evaluation: call model.eval() first (and unmerge before training)")
    originals = []
    with rescaled(model, alpha, ema):
        for name, layer in _adapted(model):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            M = layer.adapter.linear_weight()  # [d, d] fp32, alpha M~
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            for key in ("weight", "bias"):
                org = getattr(layer, key)  # W_org [d, d_in] or b_org [d]
                if org is not None:  # (I + alpha M~) W_org = W_org + alpha M~ W_org, same for b
                    rep = org.float() + M @ org.float()
                    setattr(plain, key, nn.Parameter(rep.to(org.dtype), requires_grad=False))
            setattr(parent, attr, plain.train(False))
            originals.append((parent, attr, layer))
    hooks = [getattr(model, t).register_forward_pre_hook(_refuse_training) for t in TOWERS]
    model._r_adapter_merged = dict(alpha=alpha, originals=originals, hooks=hooks)  # not in the module tree
    return model


def unmerge(model):
    """Put back the original Linear weights (bit for bit) and the live adapters."""
    state = getattr(model, "_r_adapter_merged", None)
    if state is None:
        raise RuntimeError("unmerge: the model is not merged")
    for hook in state["hooks"]:
        hook.remove()
    for parent, attr, layer in state["originals"]:
        setattr(parent, attr, layer.to(getattr(parent, attr).weight.device))
    model._r_adapter_merged = None
    return model


@contextmanager
def merged(model, alpha=0.5, ema=None):
    """Evaluate the merged model inside the block: model.eval(), merge; then unmerge and restore
    the train/eval mode."""
    _require_unmerged(model, "merged")
    training = model.training
    merge(model.eval(), alpha, ema)
    try:
        yield model
    finally:
        unmerge(model).train(training)


def export_merged(model, path, alpha=0.5, ema=None):
    """Write the merged model as a plain OpenAI-named CLIP (clip_weights.load_clip and open_clip
    read it). The model itself is left unmerged, in its train/eval mode."""
    with merged(model, alpha, ema):
        save_clip(model, path)


# --------------------------------------------------------------- checkpoints
def save_adapters(model, path, ema=None):
    """Adapter (and EMA) tensors as safetensors; config and base CLIPConfig as JSON metadata."""
    path = Path(path)
    tensors = {n: p.cpu().contiguous() for n, p in adapter_state_dict(model).items()}
    if ema is not None:
        ema._live(model, "save_adapters")
        tensors.update({f"ema.{n}": w.cpu().contiguous() for n, w in ema.shadow.items()})
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
    add_adapters(model, **info["config"])
    prefix = "ema." if use_ema else ""
    _copy_into(
        dict(adapter_parameters(model)),
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith("ema.") == use_ema},
        path,
    )
    return model


def load_ema(model, path):
    """The AdapterEMA saved in path, for a model carrying the same adapters (e.g. from load_adapters)."""
    path, info, tensors = _read(path)
    if info["ema_m"] is None:
        raise WeightsError(f"{path}: holds no EMA weights (saved without ema=)")
    ema = AdapterEMA(model, info["ema_m"])
    _copy_into(ema.shadow, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, path)
    return ema
