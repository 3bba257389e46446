"""LoRA (Hu et al., ICLR 2022): a low-rank update of frozen weights, folded away at evaluation.

Each wrapped Linear computes y = x W^T + b + scale * (x A^T) B^T, A: r x d_in (Kaiming-uniform), B:
d_out x r (zero), so a fresh model is zero-shot CLIP bit for bit. Placement here: qkv and the
attention output projection of every block of both towers (close to CLIP-LoRA's few-shot set-up;
ViT-B/16 at r 8: 737,280 parameters). reparam.py merges it, W_rep = W_org + alpha * scale * B A, at
alpha (1, its recipe, is LoRA's model; below 1 a WiSE-style blend of zero-shot and fine-tuned).
"""

import torch
import torch.nn.functional as F
from torch import nn

import reparam
from method import reparameterised


class LoRALinear(reparam.Foldable, nn.Linear):
    """y = x W^T + b + scale * (x A^T) B^T. Shares W and b with the Linear it wraps (same keys)."""

    def __init__(self, base: nn.Linear, rank, scale=1.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.scale = base.in_features, base.out_features, scale
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, self.in_features, **kw), a=5**0.5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def fold(self, alpha):
        """W_rep = W + alpha * scale * B A (fp32); the bias is LoRA's untouched."""
        delta = self.scale * self.lora_B.float() @ self.lora_A.float()
        return self.weight.float() + alpha * delta, None if self.bias is None else self.bias.float()


def lora_sites(tower):
    """LoRA's wrapping rule here: qkv and the attention output projection of each block of a tower."""
    for block in tower.blocks:
        yield block.attn, "qkv"
        yield block.attn, "proj"


def add_lora(model, rank=8, scale=1.0):
    """Freeze CLIP; wrap qkv and proj of every block of both towers in LoRALinear (rank r). Merged
    for evaluation and export by reparam.py."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA needs an integer rank >= 1 (--rank), got {rank!r}")
    sites = [s for tower in (model.visual, model.text) for s in lora_sites(tower)]
    return reparam.wrap(model, sites, lambda linear: LoRALinear(linear, rank, scale))


def setup(model, cfg, task):
    """--method lora (method.py's contract): LoRA of rank r trained on the task's loss; its EMA when
    m > 0 (its recipe: none); the row scored merged at alpha."""
    add_lora(model, rank=cfg.rank)
    return reparameterised("LoRA", model, cfg, task)
