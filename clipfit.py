"""CLIPFit (Li et al., EMNLP 2024): fine-tune only a few bias and LayerNorm parameters of CLIP.

What trains (the paper's Fig. 2 and method section; everything else is frozen, the logit scale too):
  text tower   the bias b_2 of the FFN's second linear layer W_2 in every block (OpenAI
               `mlp.c_proj.bias`, ours `text.blocks.N.mlp.fc2.bias`);
  image tower  every LayerNorm's gain and bias: ln_pre, ln_1 and ln_2 of every block, ln_post.
ViT-B/16: 12 * 512 + (1 + 2 * 12 + 1) * 2 * 768 = 46,080. The paper reports about 44K; the released
trainer (trainers/ClipFit.py) unfreezes exactly these 46,080, and so do we.

Objective, with f, g the normalised image and class text embeddings under ONE hand-written
template per dataset and g^0 the same prompts' embeddings under the zero-shot model:
    L = CE(f . g_c / tau, y) + lambda * (1 - (1/C) sum_c cos(g_c, g_c^0))
(knowledge distillation on the text side; lambda 8 for base-to-new, 2 for few-shot except DTD and
SUN397). Its optimiser recipe is in recipes.py. Where ours differs from the release (CoOp/Dassl):
the cosine steps per iteration rather than per epoch, and the crop keeps scale 0.9-1.
"""

import re

import torch
import torch.nn.functional as F

from method import Method

# Our names (clip_model.py) of what CLIPFit trains; OpenAI names in the docstring above.
TRAINABLE_PATTERNS = (
    r"text\.blocks\.\d+\.mlp\.fc2\.bias",  # text FFN W_2 bias, every block
    r"visual\.norm_pre\.(weight|bias)",  # ln_pre
    r"visual\.blocks\.\d+\.norm[12]\.(weight|bias)",  # ln_1, ln_2 of every block
    r"visual\.norm\.(weight|bias)",  # ln_post
)
_TRAINABLE = re.compile("|".join(f"(?:{p})" for p in TRAINABLE_PATTERNS))

LAMBDA = 8.0  # base-to-new and the release's default (few-shot values: recipes.py)


def trainable_names(model):
    names = [n for n, _ in model.named_parameters() if _TRAINABLE.fullmatch(n)]
    cfg = model.config  # guard against a model whose names differ from clip_model's
    want = cfg.text_layers + 2 * (2 * cfg.vision_layers + 2)
    if len(names) != want:
        raise ValueError(f"CLIPFit expected {want} tensors to train, found {len(names)}: is this clip_model.CLIP?")
    return names


def unfreeze(model):
    """Freeze everything, then unfreeze the text FFN W_2 biases and the image LayerNorms."""
    names = set(trainable_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return model


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_count(config):
    """Text: layers * width (one bias per block); image: (2 * layers + 2) LayerNorms * 2 * width."""
    return config.text_layers * config.text_width + (2 * config.vision_layers + 2) * 2 * config.vision_width


def class_embeddings(model, prompts):
    """[C, e] normalised text embeddings of [C, L] prompt tokens, without gradient. Called before
    training it gives the zero-shot anchor g^0."""
    with torch.no_grad():
        return model.encode_text(prompts.to(next(model.parameters()).device), normalize=True).float()


def regularizer(g, g0):
    """Knowledge-distillation term 1 - (1/C) sum_c cos(g_c, g_c^0): 0 at initialisation, <= 2."""
    return 1 - F.cosine_similarity(g.float(), g0.float(), dim=-1).mean()


def loss(f, g, g0, labels, tau, lam=LAMBDA):
    """CLIPFit's objective on a batch: f [B, e] image and g [C, e] class embeddings (normalised),
    g0 [C, e] the frozen zero-shot ones, tau = 1 / logit scale."""
    logits = f.float() @ g.float().T / tau  # [B, C]
    return F.cross_entropy(logits, labels) + lam * regularizer(g, g0)


def prepare(model, prompts, tau, lam=LAMBDA):
    """Set up CLIPFit on `model` and return its batch loss (net, images, labels, tokens) -> L, with
    prompts [C, L] the one template per class; g^0 is taken before anything trains."""
    anchor = class_embeddings(model, prompts)
    unfreeze(model)

    def batch_loss(net, images, labels, tokens=None):
        f, g, _ = net(images, prompts.to(images.device))
        return loss(f, g, anchor, labels, tau, lam)

    return batch_loss


def setup(model, cfg, task):
    """--method clipfit (method.py's contract): CLIPFit's objective with lambda = cfg.clipfit_lambda over
    the task's first training template, the table row scored as trained."""
    return Method(loss=prepare(model, task.prompts[0], task.tau, cfg.clipfit_lambda), rows=[(cfg.method, None)])
