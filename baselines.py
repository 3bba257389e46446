"""Baselines next to R-Adapter and CLIPFit (PAPER.md section 4): small pieces train.py plugs in.

Each method names what trains; its loss lives in train.compute_loss and its optimiser recipe in
train.METHOD_RECIPES (applied for every flag not given on the command line). Counts for ViT-B/16
(768-wide image tower, 512-wide text tower, 512-d embedding, 12 blocks each).

full-ft       every weight of both towers (the logit scale stays frozen), trained like R-Adapter
              (MPM-NCE, its optimiser flags). full_finetune(model). B/16: 149,620,736 (all
              parameters but the scale).
wise-ft       full-ft, evaluated by weight-space interpolation with the zero-shot weights,
              theta = alpha theta_ft + (1 - alpha) theta_zs (Wortsman et al., CVPR 2022;
              evaluate.interpolated), swept over alpha = 0, 0.1, ..., 1. Same training as full-ft
              (WiSE-FT's own fine-tuning differs: CE through a zero-shot-initialised head on the
              image tower, AdamW lr 3e-5, weight decay 0.1).
flyp          "Finetune Like You Pretrain" (Goyal et al., CVPR 2023): full fine-tuning with CLIP's
              own contrastive loss (InfoNCE; other images of the same class are negatives) on
              (image, class name in a random template) pairs; AdamW lr 1e-5, weight decay 0.1
              (its ImageNet recipe). The logit scale stays frozen here, as in every method of
              this repository (FLYP's code, to our knowledge, trains it with the rest).
linear-probe  the towers are frozen; a bias-free linear classifier W [C, e] on the normalised image
              features, initialised from the zero-shot head: W = the class text embeddings (the
              evaluation classifier: normalised mean over all templates), logits = f W^T / tau with
              tau = 1 / logit scale, so step 0 is exactly zero-shot CLIP (a "ZS-LP"). Trained with
              CE; at evaluation W replaces the text classifier (argmax is scale free). Bias-free so
              it plugs into evaluate.evaluate_task(classifier=W). add_linear_probe(model, W).
              B/16 on ImageNet: 1000 * 512 = 512,000.
prolip        "Fine-tuning CLIP's last visual projector" (Fahes et al., 2024): only the visual
              projection W (ours `visual.head.weight`, OpenAI `visual.proj`, 768 * 512 = 393,216)
              trains; loss CE(f W . g_c / tau) + (1/N) ||W - W0||_F^2 with the frozen zero-shot
              classifier g (all templates), W0 the pretrained projection and N the number of shots
              (the released code: squared error summed, lambda = 1/N, Adam lr 1e-3, cosine; it
              trains full-batch on cached pre-projection features of 300 augmented views, we train
              through the frozen tower in mini-batches: the same objective).
              Without --shots, N = the mean number of training images per class (the same rule
              extended to full data: more data, weaker anchor). setup_prolip(model), prolip_loss.
lora          LoRA (Hu et al., ICLR 2022) on the attention projections qkv and proj of every block
              of both towers: W x + scale * B A x, A [r, d_in] Kaiming-uniform, B [d_out, r] zero
              (starts at zero-shot CLIP), scale = 1 (alpha = r). Merged into plain Linear layers at
              evaluation (lora_merged), so the evaluated and exported model is a plain CLIP.
              Per block r * (4d + 2d): B/16 with r = 8: 12*6*8*768 + 12*6*8*512 = 737,280.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------- full-ft, flyp, wise-ft
def full_finetune(model):
    """Every weight trains, except the logit scale (frozen in every method here)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name != "logit_scale")
    return model


# ---------------------------------------------------------------------- linear-probe
def add_linear_probe(model, class_embeddings):
    """Freeze CLIP; attach `model.linear_probe`, a bias-free Linear(e -> C) whose weight starts at
    the [C, e] zero-shot class embeddings. Checkpoints see it as `linear_probe.weight`."""
    model.requires_grad_(False)
    C, e = class_embeddings.shape
    probe = nn.Linear(e, C, bias=False, device=class_embeddings.device)
    with torch.no_grad():
        probe.weight.copy_(class_embeddings)
    model.linear_probe = probe  # trainable; not part of a CLIP checkpoint (save it separately)
    return probe


# ---------------------------------------------------------------------------- prolip
def setup_prolip(model):
    """Only the visual projection trains; returns W0, a frozen copy of it."""
    model.requires_grad_(False)
    head = model.visual.head.weight  # [e, d]: f = x W^T (OpenAI: x @ proj, proj = W^T)
    head.requires_grad_(True)
    return head.detach().clone()


def prolip_weight(shots, n_train, n_classes):
    """lambda = 1/N: N = shots, or the mean number of training images per class."""
    return 1.0 / (shots or n_train / n_classes)


def prolip_loss(f, classifier, labels, tau, W, W0, lam):
    """CE over the frozen classifier [C, e] + lam * ||W - W0||_F^2 (summed squares, as released)."""
    ce = F.cross_entropy(f.float() @ classifier.float().T / tau, labels)
    return ce + lam * (W.float() - W0.float()).pow(2).sum()


# ------------------------------------------------------------------------------ lora
class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * (x A^T) B^T. Shares W and b with the Linear it wraps (same keys)."""

    def __init__(self, base: nn.Linear, rank, scale=1.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.scale = base.in_features, base.out_features, scale
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, self.in_features, **kw), a=5 ** 0.5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def merged_linear(self):
        """A plain frozen nn.Linear with W + scale * B A (computed in fp32, cast once)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = self.scale * self.lora_B.float() @ self.lora_A.float()
        plain.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        plain.bias = self.bias
        return plain


def _lora_sites(model):
    for tower in (model.visual, model.text):
        for block in tower.blocks:
            yield block.attn, "qkv"
            yield block.attn, "proj"


def add_lora(model, rank=8, scale=1.0):
    """Freeze CLIP; wrap qkv and proj of every block of both towers in LoRALinear (rank r)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA needs an integer rank >= 1 (--rank), got {rank!r}")
    model.requires_grad_(False)
    for parent, name in _lora_sites(model):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, scale))
    return model


@contextmanager
def lora_merged(model):
    """Evaluate (or save_clip) the model with every LoRA folded into its Linear; the LoRA layers
    are put back afterwards, untouched, and the train/eval mode restored."""
    training, swapped = model.training, []
    model.eval()
    for parent, name in _lora_sites(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            setattr(parent, name, layer.merged_linear())
            swapped.append((parent, name, layer))
    try:
        yield model
    finally:
        for parent, name, layer in swapped:
            setattr(parent, name, layer)
        model.train(training)
