"""R-Adapter (Kim, Jeong, Kim, Kwak, ECCV 2024, Sec. 3.3): adapters, adapter dropping, the method's setup.

Adapter. A linear, bias-free, residual module h(X) = X + s X W_adp (row vectors, X: tokens x d),
after the attention output projection W_O (`attn.proj`) and after the FFN's W_2 (`mlp.fc2`) of every
block of both towers, before the residual addition. Full rank: W_adp is d x d (ViT-B/16: 20,447,232
weights + 48 scales s). Low rank: W_adp = (B A)^T, A: r x d random, B: d x r zero. W_adp starts at
zero, so a fresh model is zero-shot CLIP bit for bit; s is learnable (init 0.1, as released).
Everything else is frozen, the logit scale included.

Re-parameterisation and re-scaling. As a Linear weight the adapter is M = s W_adp^T, h(y) = y + y M^T,
so the pair folds into one Linear: AdaptedLinear.fold(alpha) is the paper's W_rep = W_org + alpha M W_org
(b likewise), with alpha the weight-space ensemble's coefficient (0: zero-shot CLIP, 1: the fine-tuned
model). reparam.py merges, unmerges and exports it, as it does LoRA and SSF; reparam.EMA is the
temporal ensemble W~ <- m W~ + (1 - m) W, which the paper merges.

Dynamic ensemble (adapter dropping): in training each branch is kept with probability 1 - p and
scaled by 1 / (1 - p); one draw per sample and adapter (the paper's sub-networks, drop_mode
'sample') or per token position shared by the batch ('token', the released code's timm DropPath).

Where the released code (github.com/tjddus9597/R-Adapter-ECCV2024) differs: per-token dropping
(drop_mode='token'); its low-rank branch is unreachable, since building and merging test opposite
rank conditions (github.com/tjddus9597/R-Adapter-ECCV2024/issues/1), while ours runs both; its
merged evaluation hard-wires alpha = 0.5.
"""

import torch
import torch.nn.functional as F
from torch import nn

import reparam
from clip_model import count_trainable
from method import reparameterised

TOWERS = ("visual", "text")
DROP_MODES = ("sample", "token")


class Adapter(nn.Module):
    """The branch of h(y) = y + s y W_adp: linear, bias-free, zero-initialised."""

    def __init__(self, d, rank=None, learn_scale=True, drop_p=0.2, drop_mode="sample", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.rank, self.drop_p, self.drop_mode = rank, drop_p, drop_mode
        if rank is None:
            self.W_adp = nn.Parameter(torch.zeros(d, d, **kw))  # [d_in, d_out], paper's row convention
        else:
            self.A = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, d, **kw)))  # [r, d] down
            self.B = nn.Parameter(torch.zeros(d, rank, **kw))  # [d, r] up
        self.register_parameter("s", nn.Parameter(torch.tensor(0.1, **kw)) if learn_scale else None)

    def forward(self, y):  # y: [N, L, d] -> s y W_adp, dropped in training
        z = y @ self.W_adp if self.rank is None else F.linear(F.linear(y, self.A), self.B)
        if self.s is not None:
            z = z * self.s
        if self.training and self.drop_p > 0:  # gamma ~ Bernoulli(1 - p), the branch scaled by gamma / (1 - p)
            # one gamma per sample, [N, 1, 1], or per token position shared by the batch, [1, L, 1]
            shape = (len(z),) + (1,) * (z.dim() - 1) if self.drop_mode == "sample" else (1, *z.shape[1:-1], 1)
            z = z * z.new_empty(shape).bernoulli_(1 - self.drop_p) / (1 - self.drop_p)  # [N, L, d]
        return z

    def linear_weight(self):
        """M = s W_adp^T, the branch as a [d_out, d_in] Linear weight, fp32."""
        M = self.W_adp.float().T if self.rank is None else self.B.float() @ self.A.float()
        return M if self.s is None else M * self.s.float()

    def extra_repr(self):
        return f"rank={self.rank or 'full'}, drop_p={self.drop_p}, drop_mode={self.drop_mode}"


class AdaptedLinear(reparam.Foldable, nn.Linear):
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

    def fold(self, alpha):
        """W_rep = W_org + alpha M W_org and b_rep = b_org + alpha M b_org (fp32)."""
        M, W = self.adapter.linear_weight(), self.weight.float()  # M [d, d], W_org [d, d_in]
        b = None if self.bias is None else self.bias.float() + alpha * M @ self.bias.float()
        return W + alpha * M @ W, b


# ------------------------------------------------------------------ attaching
def sites(tower):
    """R-Adapter's wrapping rule: W_O and W_2 of each block of a tower, as (parent, name)."""
    for block in tower.blocks:
        yield block.attn, "proj"
        yield block.mlp, "fc2"


def _adapted(model):
    """[(name, AdaptedLinear)] in module order; the model must carry unmerged adapters."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    if not layers:
        raise RuntimeError("the model has no adapters: call r_adapter.add_adapters or load_adapters first")
    return layers


def add_adapters(model, rank=None, drop_p=0.2, drop_mode="sample", learn_scale=True):
    """Attach the 4 * layers adapters of R-Adapter and freeze everything else (logit scale too)."""
    reparam.require_unmerged(model, "add_adapters")
    if getattr(model, "r_adapter_config", None) is not None:
        raise RuntimeError(f"the model already has adapters {model.r_adapter_config}")
    ranks = dict(rank) if isinstance(rank, dict) else dict.fromkeys(TOWERS, rank)
    if set(ranks) != set(TOWERS) or not all(r is None or (isinstance(r, int) and r >= 1) for r in ranks.values()):
        raise ValueError(f"rank must be None (full), an int >= 1 or {{'visual': r, 'text': r}}, got {rank!r}")
    if not 0 <= drop_p < 1 or drop_mode not in DROP_MODES:
        raise ValueError(f"need 0 <= drop_p < 1 and drop_mode in {DROP_MODES}, got {drop_p}, {drop_mode!r}")

    rank_of = {id(getattr(parent, name)): ranks[t] for t in TOWERS for parent, name in sites(getattr(model, t))}

    def attach(linear):
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        adapter = Adapter(linear.out_features, rank_of[id(linear)], learn_scale, drop_p, drop_mode, **kw)
        return AdaptedLinear(linear, adapter)

    reparam.wrap(model, [s for t in TOWERS for s in sites(getattr(model, t))], attach)
    model.r_adapter_config = dict(rank=ranks, drop_p=drop_p, drop_mode=drop_mode, learn_scale=learn_scale)
    return model


def adapter_parameters(model, action="adapter_parameters"):
    """[(name, Parameter)] of every adapter, e.g. 'visual.blocks.0.attn.proj.adapter.W_adp'."""
    reparam.require_unmerged(model, action)
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


# ------------------------------------------------------------- the method
def setup(model, cfg, task):
    """R-Adapter as --method r-adapter (method.py's contract): adapters with dropping p trained on the
    task's loss (MPM-NCE, Sec. 3.4), their EMA W~ with momentum m (none at m = 0), and the table row
    scored with W~ merged into W_rep at alpha (Sec. 3.3)."""
    add_adapters(model, rank=cfg.rank, drop_p=cfg.p, drop_mode=cfg.drop_mode)
    return reparameterised("R-Adapter", model, cfg, task)
