"""What a fine-tuning method is to the code that trains and scores it: one contract for every method.

Each method's file has one `setup(model, cfg, task) -> Method` (methods.py maps the --method names to
them): it makes the method's parameters, and only those, trainable, and says how to train and score:

    loss        a micro-batch's loss: (net, images [B,3,H,W], labels [B], tokens [B,L] or None) -> scalar
    rows        the table rows it reports, [(name, alpha)], each scored under weights(alpha)
    weights     alpha -> a context holding the evaluation weights (R-Adapter: its EMA merged at alpha)
    after_step  called after every optimiser step (R-Adapter: the EMA update W~ <- m W~ + (1 - m) W)
    ema         the temporal ensemble (R-Adapter Sec. 3.3, reparam.EMA), kept in checkpoints
    classifier  full-ft, linear-probe: the head's [C, e] weight, which replaces the zero-shot classifier
    classifier_for  CoOp, CoCoOp: class names -> the classifier their learned prompts give

`Task` is what a setup may read of the data. Its `objective` is the task's own loss (MPM-NCE over
class prompts or captions for classification and retrieval, CAT-Seg's per-class BCE for
segmentation): the methods that change only what trains (R-Adapter, LoRA, SSF, FLYP) train with it;
CLIPFit, CoOp, CoCoOp, ProLIP and the head of full-ft bring their own.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

import reparam


@dataclass
class Task:
    objective: Callable  # the task's loss: (net, images, labels, tokens) -> scalar
    classnames: list = field(default_factory=list)  # none for retrieval and segmentation
    prompts: Optional[torch.Tensor] = None  # [T, C, L] tokens: every training template with every class name
    eval_templates: list = field(default_factory=list)  # the zero-shot classifier's templates
    n_train: int = 0  # training images
    tau: float = 0.01  # temperature: 1 / CLIP's frozen logit scale


@dataclass
class Method:
    loss: Callable
    rows: list
    weights: Callable = lambda alpha: nullcontext()
    curve: Optional[str] = None  # the name of its alpha sweep (--sweep), if it has one
    after_step: Callable = lambda: None
    ema: Optional[reparam.EMA] = None
    classifier: Optional[torch.Tensor] = None
    classifier_for: Optional[Callable] = None


def reparameterised(name, model, cfg, task):
    """The face of a method whose wrapped layers fold into plain ones (R-Adapter, LoRA, SSF; reparam.py),
    once they are attached: trained on the task's loss, the EMA W~ <- m W~ + (1 - m) W after every step
    (none at m = 0), and the table row scored with W~ merged at alpha."""
    ema = reparam.EMA(model, m=cfg.m) if cfg.m > 0 else None
    return Method(
        loss=task.objective,
        rows=[(f"{name} (α={cfg.alpha:g})", cfg.alpha)],
        weights=lambda alpha: reparam.merged(model, alpha, ema=ema),
        curve=name,
        after_step=(lambda: ema.update(model)) if ema else lambda: None,
        ema=ema,
    )
