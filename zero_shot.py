"""The zero-shot classifier (Radford et al., ICML 2021, Sec. 3.1.4): prompt ensembling over templates."""

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
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, embed]
    return torch.nn.functional.normalize(feats, dim=-1)
