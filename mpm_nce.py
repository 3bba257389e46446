"""MPM-NCE, the Multi-Positive Margin contrastive loss of R-Adapter.

Kim et al., "Efficient and Versatile Robust Fine-Tuning of Zero-shot Models", ECCV 2024, Sec. 3.4.

A batch holds B image/text pairs (f_i, g_i) with labels: the class id for classification, the
image id for retrieval (so the several captions of one image are positives of each other).
Features are L2-normalised. Pairs i and j are positives when they share a label:

    y_ij = 1 if label_i == label_j else 0,        P(i) = {j : y_ij = 1}   (i is in P(i))

Soft targets spread 1 - epsilon over the positives and epsilon over the negatives:

    t_ij = (1 - epsilon) y_ij / |P(i)| + epsilon (1 - y_ij) / (B - |P(i)|)

and a row with no negatives (|P(i)| = B) puts all its mass on the positives. Logits carry an
additive margin delta on the NEGATIVE pairs, which makes the negatives harder:

    z_ij = (f_i . g_j + delta_ij) / tau,          delta_ij = 0 if y_ij = 1 else delta

The loss is the mean of the image->text and text->image cross-entropies:

    L = 1/2 [ 1/B sum_i CE(softmax_j z_ij, t_i.)  +  1/B sum_j CE(softmax_i z_ij, t_j.) ]

Because y is symmetric, the targets of text j over the images are row j of the same matrix t.
tau = 0.01 is CLIP's frozen logit scale 100; the paper uses delta = 0.05, epsilon = 0.02 on
ImageNet and epsilon = 0 for retrieval and base-to-novel. With distinct labels, epsilon = 0 and
delta = 0 it is exactly CLIP's InfoNCE. Under data parallelism the loss is over the global batch
(gather_features keeps the gradient of every rank's features).
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from distributed import shared_randint


def _check(image_features, text_features, tau):
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must both be [B, D], got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def soft_targets(labels, epsilon=0.0):
    """The [B, B] soft-target matrix t of MPM-NCE for labels [B]; each row sums to 1 (fp32)."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [B], got shape {tuple(labels.shape)}")
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    y = (labels[:, None] == labels[None, :]).float()  # [B, B], 1 on positives
    n_pos = y.sum(dim=1, keepdim=True)  # [B, 1], |P(i)| >= 1
    n_neg = len(labels) - n_pos  # [B, 1], B - |P(i)|
    eps = epsilon * (n_neg > 0)  # [B, 1], a row without negatives keeps all mass on positives
    return (1 - eps) * y / n_pos + eps * (1 - y) / n_neg.clamp(min=1)


def mpm_nce_loss(image_features, text_features, labels, tau=0.01, delta=0.05, epsilon=0.0):
    """MPM-NCE loss (scalar, fp32) of image/text features [B, D] with labels [B].

    Features need not be normalised; the logits are computed in fp32 even under autocast.
    """
    _check(image_features, text_features, tau)
    if labels.ndim != 1 or len(labels) != len(image_features):
        raise ValueError(f"labels must be [B] = [{len(image_features)}], got {tuple(labels.shape)}")
    labels = labels.to(image_features.device)
    t = soft_targets(labels, epsilon)  # [B, B]
    negative = labels[:, None] != labels[None, :]  # [B, B], 1 - y_ij
    with torch.autocast(image_features.device.type, enabled=False):
        f = F.normalize(image_features.float(), dim=-1)  # [B, D]
        g = F.normalize(text_features.float(), dim=-1)  # [B, D]
        z = (f @ g.T + delta * negative) / tau  # [B, B], z_ij: image i vs text j
        # image->text: softmax over j (rows); text->image: softmax over i (rows of z.T)
        return (F.cross_entropy(z, t) + F.cross_entropy(z.T, t)) / 2


def infonce_loss(image_features, text_features, tau=0.01):
    """CLIP's symmetric InfoNCE loss (scalar, fp32): pair i is the only positive of row i."""
    _check(image_features, text_features, tau)
    with torch.autocast(image_features.device.type, enabled=False):
        f = F.normalize(image_features.float(), dim=-1)  # [B, D]
        g = F.normalize(text_features.float(), dim=-1)  # [B, D]
        z = f @ g.T / tau  # [B, B]
        target = torch.arange(len(z), device=z.device)  # [B]
        return (F.cross_entropy(z, target) + F.cross_entropy(z.T, target)) / 2


def gather_features(image_features, text_features, labels):
    """All-gather [b, D] features and [b] labels from every rank into the global [W*b] batch.

    Identity unless torch.distributed is initialised with world size W > 1. Every rank must
    hold the same local batch size b (use drop_last=True). Labels carry no gradient; the
    features are gathered with torch.distributed.nn's all_gather, whose backward sums the
    gradient of each slot over all ranks. Each rank then computes the same loss L over the
    global batch, and the gradient reaching its local features is W * dL/d(local features):
    W identical copies of the global-batch gradient. DDP divides the summed parameter
    gradients by W, so training matches single-process training on the global batch exactly,
    with no extra scaling of the loss.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features, labels
    image_features = torch.cat(dist_nn.all_gather(image_features), dim=0)  # [W*b, D]
    text_features = torch.cat(dist_nn.all_gather(text_features), dim=0)  # [W*b, D]
    all_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(all_labels, labels.contiguous())
    return image_features, text_features, torch.cat(all_labels)  # labels: [W*b]


# ------------------------------------------------- the loss of a training batch
def in_random_templates(prompts, labels, ddp=(0, 1)):
    """Each label's class name in a template drawn at random (Sec. 3.4: the pairs of a classification
    batch): prompts [T, C, L] tokens, labels [B] -> [B, L]. The draw is made for world_size x B labels
    at once, as one process would draw it for the global batch, and rank ddp_rank takes its slice:
    ddp = (ddp_rank, world_size)."""
    (ddp_rank, world_size), B = ddp, len(labels)
    picks = shared_randint(len(prompts), B * world_size)[ddp_rank * B : (ddp_rank + 1) * B]  # [B] template indices
    return prompts[picks, labels]  # [B, L]


def objective(loss, prompts, tau, delta=0.05, epsilon=0.0):
    """The batch loss (net, images, labels, tokens) -> scalar of --loss: 'mpm-nce' (Sec. 3.4) or
    'infonce' over the global batch, each image paired with its caption (tokens, retrieval) or with its
    class name in a random template (prompts [T, C, L]); or 'ce', cross-entropy over every class, each
    in a random template (the same on every rank)."""

    def contrastive(net, images, labels, tokens):
        if tokens is None:  # each image with its class name in a template drawn for the global batch
            ddp = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            tokens = in_random_templates(prompts, labels.cpu(), ddp)
        f, g, _ = net(images, tokens.to(images.device))  # [B, e], [B, e]
        f, g, labels = gather_features(f, g, labels)  # the global batch: [W*B, e], [W*B, e], [W*B]
        if loss == "infonce":
            return infonce_loss(f, g, tau)
        return mpm_nce_loss(f, g, labels, tau=tau, delta=delta, epsilon=epsilon)

    def class_ce(net, images, labels, tokens):
        f, g, _ = net(images, in_random_templates(prompts, torch.arange(prompts.shape[1])).to(images.device))
        return F.cross_entropy((f @ g.T).float() / tau, labels)  # [B, C] logits

    return class_ce if loss == "ce" else contrastive
