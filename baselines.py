"""Baselines next to R-Adapter and CLIPFit: what each trains, its loss where it has its own, its
evaluation weights. Their recipes are in recipes.py; ViT-B/16 counts in brackets.

full-ft       WiSE-FT's end-to-end fine-tuning (Wortsman et al., CVPR 2022; mlfoundations/wise-ft,
              src/models/finetune.py): the image tower and a linear head initialised from the
              zero-shot classifier train with cross-entropy; the text tower stays frozen. This is the
              R-Adapter paper's FT row [86,192,640 + 512,000]. The release's head has a zero-initialised
              bias; ours is bias-free, so the head is the classifier evaluate.py scores with. On
              retrieval (no classes) full-ft is contrastive fine-tuning of both towers.
wise-ft       full-ft evaluated at theta = alpha theta_ft + (1 - alpha) theta_zs, the head included,
              swept over alpha.
flyp          full fine-tuning of both towers with CLIP's contrastive loss on (image, class prompt)
              pairs (Goyal et al., CVPR 2023); the logit scale stays frozen, as in every method here.
linear-probe  WiSE-FT's linear classifier (its --freeze-encoder mode): the same zero-shot-initialised
              head on the frozen image tower [1000 x 512].
prolip        only the visual projection W trains (Fahes et al., 2024): CE(f W . g_c / tau) +
              (1/N) ||W - W0||_F^2, N the shots (or the mean images per class) [393,216]. The release
              trains on cached features of augmented views; we train through the frozen tower.
lora          LoRA (Hu et al., ICLR 2022) on qkv and proj of every block of both towers, B zero-
              initialised, scale 1 [737,280 at r 8]; evaluated merged (reparam.py) at alpha, which
              scales the update B A: alpha 1 (its recipe) is LoRA's model, below 1 a WiSE-style blend.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import reparam


# ----------------------------------------------------------- full-ft, flyp, wise-ft
def full_finetune(model):
    """Every weight of both towers trains, except the logit scale (frozen in every method here)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name != "logit_scale")
    return model


def finetune_image_tower(model):
    """WiSE-FT's end-to-end fine-tuning: the image tower (and the classification head, if any) train."""
    model.requires_grad_(False)
    model.visual.requires_grad_(True)
    if hasattr(model, "classification_head"):
        model.classification_head.requires_grad_(True)
    return model


def snapshot(model):
    """A copy of every weight: the zero-shot end of WiSE-FT's interpolation."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextmanager
def wise_ft(model, zero_shot, alpha):
    """The model at theta = alpha theta_ft + (1 - alpha) theta_zs inside the block (fp32 math, cast
    once), its fine-tuned weights again after it."""
    finetuned = snapshot(model)
    with torch.no_grad():
        model.load_state_dict(
            {k: (alpha * finetuned[k].float() + (1 - alpha) * v.float()).to(v.dtype) for k, v in zero_shot.items()}
        )
    try:
        yield model
    finally:
        model.load_state_dict(finetuned)


# ------------------------------------------------------- the head of full-ft and linear-probe
def add_classification_head(model, class_embeddings):
    """Freeze CLIP; attach `model.classification_head`, WiSE-FT's zero-shot head: a bias-free
    Linear(e -> C) whose weight starts at s * the [C, e] normalised zero-shot class embeddings (s =
    the logit scale), applied to normalised image features, so step 0 is zero-shot CLIP. Checkpoints
    see it as `classification_head.weight`."""
    model.requires_grad_(False)
    C, e = class_embeddings.shape
    head = nn.Linear(e, C, bias=False, device=class_embeddings.device)
    with torch.no_grad():
        head.weight.copy_(model.logit_scale.exp() * class_embeddings)
    model.classification_head = head  # trainable; not part of a CLIP checkpoint (saved apart)
    return head


def head_loss(head):
    """CE of head(f) on the normalised image features f; through net(images) so that DDP syncs."""

    def batch_loss(net, images, labels, tokens=None):
        return F.cross_entropy(head(net(images)[0].float()), labels)

    return batch_loss


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


def prolip(model, classifier, tau, lam):
    """Set up ProLIP on `model` and return its batch loss over the frozen [C, e] classifier."""
    W0 = setup_prolip(model)

    def batch_loss(net, images, labels, tokens=None):
        return prolip_loss(net(images)[0], classifier, labels, tau, model.visual.head.weight, W0, lam)

    return batch_loss


# ------------------------------------------------------------------------------ lora
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
