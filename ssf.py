"""SSF (Lian, Zhou, Feng, Wang, NeurIPS 2022): scale and shift the features, fold both away at inference.

After an operation with output y, SSF computes y' = gamma * y + beta per channel (the paper's
method section), gamma and beta the only trained parameters. Placement (the paper's Fig. 2 and its released
ViT, github.com/dongzelian/SSF, models/vision_transformer.py): in every block after LN1, qkv, the
attention projection, LN2, fc1 and fc2; outside the blocks after the final LayerNorm. Here: every
block of both towers, and every LayerNorm outside them (ln_pre, ln_post, ln_final); ViT-B/16:
12 * 22 * (768 + 512) + 2 * 2 * 768 + 2 * 512 = 342,016 parameters.

Re-parameterisation (as the paper derives it): gamma and beta fold into the preceding layer, W' = gamma W
(row-wise), b' = gamma b + beta. ScaleShift.fold(alpha) folds gamma_alpha = 1 + alpha (gamma - 1)
and beta_alpha = alpha beta, i.e. W_rep = W_org + alpha (gamma - 1) W_org; reparam.py merges,
unmerges and exports (alpha 1, SSF's model, is its recipe).

Where the release differs: it draws gamma ~ N(1, 0.02) and beta ~ N(0, 0.02); we start at gamma = 1,
beta = 0, so a fresh model is zero-shot CLIP bit for bit. It also scales and shifts after the patch
embedding, a bias-free convolution in CLIP into which beta cannot fold without a new bias, so not here.
"""

import torch
from torch import nn

import reparam
from method import reparameterised


class ScaleShift(reparam.Foldable):
    """Mixin: the wrapped layer's output y becomes gamma * y + beta (gamma, beta: [channels])."""

    def init_scale_shift(self, channels, like):
        self.gamma = nn.Parameter(torch.ones(channels, device=like.device, dtype=like.dtype))
        self.beta = nn.Parameter(torch.zeros(channels, device=like.device, dtype=like.dtype))

    def forward(self, x):
        return super().forward(x) * self.gamma + self.beta

    def fold(self, alpha):
        """W_rep = W + alpha (gamma - 1) W per output channel, b_rep = b + alpha ((gamma - 1) b + beta), fp32."""
        W, b = self.weight.float(), self.bias.float()
        g = (self.gamma.float() - 1).reshape(-1, *[1] * (W.dim() - 1))  # [out, 1] (Linear) or [d] (LayerNorm)
        return W + alpha * g * W, b + alpha * ((self.gamma.float() - 1) * b + self.beta.float())


class SSFLinear(ScaleShift, nn.Linear):
    """nn.Linear sharing W and b with the layer it replaces (same state-dict keys), then scale and shift."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.init_scale_shift(base.out_features, base.weight)


class SSFLayerNorm(ScaleShift, nn.LayerNorm):
    """nn.LayerNorm sharing its gain and bias with the layer it replaces, then scale and shift."""

    def __init__(self, base: nn.LayerNorm):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = base.normalized_shape, base.eps, True
        self.weight, self.bias = base.weight, base.bias
        self.init_scale_shift(base.normalized_shape[0], base.weight)


def sites(model):
    """SSF's wrapping rule: the six operations of every block of both towers, and the LayerNorms
    outside the blocks, as (parent, name)."""
    for tower in (model.visual, model.text):
        for block in tower.blocks:
            yield from ((block, "norm1"), (block.attn, "qkv"), (block.attn, "proj"))
            yield from ((block, "norm2"), (block.mlp, "fc1"), (block.mlp, "fc2"))
    yield from ((model.visual, "norm_pre"), (model.visual, "norm"), (model.text, "ln_final"))


def scale_shift(layer):
    if layer.bias is None:
        raise ValueError(f"SSF folds beta into the layer's bias; {layer} has none")
    return SSFLayerNorm(layer) if isinstance(layer, nn.LayerNorm) else SSFLinear(layer)


def add_ssf(model):
    """Freeze CLIP; scale and shift after every site (gamma = 1, beta = 0: zero-shot CLIP exactly)."""
    return reparam.wrap(model, sites(model), scale_shift)


def expected_count(config):
    """gamma + beta on 11 widths of output per block (LN1, qkv 3, proj, LN2, fc1 4, fc2) and on
    ln_pre, ln_post and ln_final."""
    blocks = 22 * (config.vision_layers * config.vision_width + config.text_layers * config.text_width)
    return blocks + 2 * 2 * config.vision_width + 2 * config.text_width


def setup(model, cfg, task):
    """--method ssf (method.py's contract): gamma and beta trained on the task's loss; their EMA (its
    recipe: m 0.99992); the row scored merged at alpha (its recipe: 1)."""
    add_ssf(model)
    return reparameterised("SSF", model, cfg, task)
