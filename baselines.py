"""Baselines next to R-Adapter and CLIPFit: what each trains, its loss where it has its own, its
evaluation weights (each method's `setup_*`, method.py's contract). Their recipes are in recipes.py;
ViT-B/16 counts in brackets. LoRA, SSF, CoOp and CoCoOp have files of their own.

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
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from method import Method
from zero_shot import zero_shot_classifier


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
def train_projection(model):
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
    W0 = train_projection(model)

    def batch_loss(net, images, labels, tokens=None):
        return prolip_loss(net(images)[0], classifier, labels, tau, model.visual.head.weight, W0, lam)

    return batch_loss


# ------------------------------------------------------ the methods (method.py's contract)
def setup_zero_shot(model, cfg, task):
    """--method zero-shot: nothing trains; the row is zero-shot CLIP."""
    model.requires_grad_(False)
    return Method(loss=task.objective, rows=[(cfg.method, None)])


def setup_flyp(model, cfg, task):
    """--method flyp: both towers train on the task's loss (contrastive: its recipe's --loss infonce)."""
    full_finetune(model)
    return Method(loss=task.objective, rows=[(cfg.method, None)])


def setup_prolip(model, cfg, task):
    """--method prolip: the visual projection trains on CE over the frozen zero-shot classifier, with
    lambda = 1 / shots."""
    classifier = zero_shot_classifier(model, task.classnames, task.eval_templates)
    lam = prolip_weight(cfg.shots, task.n_train, len(task.classnames))
    return Method(loss=prolip(model, classifier, task.tau, lam), rows=[(cfg.method, None)])


def setup_linear_probe(model, cfg, task):
    """--method linear-probe: WiSE-FT's zero-shot-initialised head on the frozen image tower; its weight
    is the classifier the row is scored with."""
    head = add_classification_head(model, zero_shot_classifier(model, task.classnames, task.eval_templates))
    return Method(loss=head_loss(head), rows=[(cfg.method, None)], classifier=head.weight)


def setup_full_ft(model, cfg, task):
    """--method full-ft and wise-ft: WiSE-FT's end-to-end fine-tuning (image tower + zero-shot head, CE;
    with no classes, both towers on the task's loss), rows at alpha = 1 and at cfg.alpha, the weights
    interpolated with the zero-shot ones (the head too)."""
    head, loss = None, task.objective
    if task.classnames:
        head = add_classification_head(model, zero_shot_classifier(model, task.classnames, task.eval_templates))
        loss = head_loss(head)
        finetune_image_tower(model)
    else:
        full_finetune(model)
    zero_shot = snapshot(model)  # the head too: WiSE-FT interpolates it with the tower
    name = "full-ft" if cfg.method == "full-ft" else "WiSE-FT (α=1)"
    return Method(
        loss=loss,
        rows=[(name, 1.0), (f"WiSE-FT (α={cfg.alpha:g})", cfg.alpha)],
        weights=lambda alpha: wise_ft(model, zero_shot, alpha),
        curve="WiSE-FT",
        classifier=None if head is None else head.weight,
    )
