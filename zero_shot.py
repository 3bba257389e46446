"""The zero-shot classifier (CLIP, Radford et al., ICML 2021, Sec. 3.1.4: prompt engineering and ensembling).

Each class name is filled into every prompt template ("a photo of a {}.", ...); the class embedding is
the mean over templates of the normalised text features, normalised again: the ensemble is built in
embedding space, so one [C, embed] matrix scores the images (logits = normalised image features @ W.T).
As in CLIP's released ImageNet prompt-engineering notebook; R-Adapter (Sec. 4.1) evaluates with it, as
WiSE-FT does. WiSE-FT's classification head starts from it (times the logit scale) and ProLIP's
cross-entropy scores against it, frozen (baselines.py).
Under torch.distributed each rank encodes its shard of the prompts and the parts are gathered in order,
so every rank holds the classifier one process builds.
"""

import torch

from clip_model import tokenize
from distributed import gather, shard


@torch.no_grad()
def zero_shot_classifier(model, classnames, templates, batch_size=1000):
    """[C, embed]: per class, the normalised mean of normalised template embeddings (each rank
    encodes its shard of the prompts under torch.distributed)."""
    device = next(model.parameters()).device
    texts = [t.format(c) for c in classnames for t in templates]  # class-major: [C*T]
    tokens = tokenize(texts, model.config.context_length)
    mine = shard(len(tokens), batch_size)
    feats = [torch.zeros(0, model.config.embed_dim)]
    for i in range(mine.start, mine.stop, batch_size):
        feats.append(model.encode_text(tokens[i : min(i + batch_size, mine.stop)].to(device), normalize=True).cpu())
    feats = torch.cat(gather(torch.cat(feats))).to(device)
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # [C*T, embed] -> [C, T, embed] -> [C, embed]
    return torch.nn.functional.normalize(feats, dim=-1)
