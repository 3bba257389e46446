"""CoOp (Zhou et al., IJCV 2022) and CoCoOp (Zhou et al., CVPR 2022): learned prompt context for CLIP.

CoOp. The text of class c is [SOS] v_1 ... v_M [name of c] . [EOT]: M context vectors v_m (token
embeddings, [M, d], d the text width) shared by every class, the class name at the end (the
paper's unified context, "end" position). CLIP is frozen; the context trains with cross-entropy
over the class logits f . g_c / tau. It starts from the token embeddings of "a photo of a" (M = 4:
the released ctxv1 configs and CoCoOp's set-up) or, with a number M, from N(0, 0.02^2) (M = 16:
CoOp's few-shot tables). ViT-B/16: M x 512 = 2,048 (M = 16: 8,192) parameters.

CoCoOp. A meta-net h = Linear(e, e/16), ReLU, Linear(e/16, d) maps each image's normalised feature
f to a shift pi = h(f) added to every context vector, v_m(x) = v_m + pi, so each image has its own
class prompts and its logits need C text passes. `similarities` batches them: the prompts of k
images go through the text tower in one pass (the released trainer loops over images). ViT-B/16:
2,048 + 33,312 = 35,360 parameters.

The text tower is causal, so nothing after a prompt's EOT changes its feature: the prompts are cut
after the longest EOT among them (exact, and far shorter than 77 tokens for class names).

Where the releases (github.com/KaiyangZhou/CoOp, trainers/coop.py and cocoop.py) differ: they count
the context from the init's words, assuming one token per word; we count its BPE tokens (the same
for "a photo of a"). Their checkpoints load (`load_prompt_learner`, `evaluate.py --prompt-learner`):
Dassl's prompt_learner/model.pth.tar-N, CoCoOp's meta-net layers named linear1/linear2 (RELEASED_NAMES).
"""

import torch
import torch.nn.functional as F
from torch import nn

from clip_model import tokenize
from method import Method
from weight_files import WeightsError, cause, read_inert, read_state_dict


class PromptLearner(nn.Module):
    """The context [M, d] (and CoCoOp's meta-net), put before any class names given at call time."""

    def __init__(self, model, ctx_init="a photo of a", conditional=False):
        super().__init__()
        embedding = model.text.token_embedding.weight  # [vocab, d]
        if ctx_init.isdigit():  # M random vectors, written as M placeholder words in the prompt
            ctx = torch.randn(int(ctx_init), embedding.shape[1], device=embedding.device) * 0.02
            self.prefix = " ".join(["X"] * int(ctx_init))
        else:  # the words' own token embeddings
            tokens = tokenize(ctx_init, model.config.context_length)[0]
            ctx = embedding.detach()[tokens[1 : tokens.argmax()]].clone()  # between SOS and EOT
            self.prefix = ctx_init
        self.ctx = nn.Parameter(ctx.to(embedding.dtype))
        self.meta_net = None
        if conditional:
            e, d = model.config.embed_dim, embedding.shape[1]
            kw = dict(device=embedding.device, dtype=embedding.dtype)
            self.meta_net = nn.Sequential(nn.Linear(e, e // 16, **kw), nn.ReLU(), nn.Linear(e // 16, d, **kw))

    def extra_repr(self):
        return f"M={len(self.ctx)}, prefix={self.prefix!r}"

    @torch.no_grad()
    def prompts(self, model, classnames):
        """Tokens [C, L'] of '<prefix> <name>.' and their frozen token embeddings [C, L', d], cut
        after the longest EOT."""
        tokens = tokenize([f"{self.prefix} {c}." for c in classnames], model.config.context_length)
        tokens = tokens[:, : tokens.argmax(dim=-1).max() + 1].to(self.ctx.device)
        return tokens, model.text.token_embedding(tokens)

    def embed(self, embeddings, shift=None):
        """The prompts with the context in positions 1..M: [C, L', d]; with per-image shifts [k, d]
        (CoCoOp), every image's prompts: [k, C, L', d]."""
        C, M = len(embeddings), len(self.ctx)
        sos, names = embeddings[:, :1], embeddings[:, 1 + M :]
        if shift is None:
            return torch.cat([sos, self.ctx.expand(C, -1, -1), names], dim=1)
        k = len(shift)
        ctx = (self.ctx + shift[:, None]).unsqueeze(1).expand(k, C, M, -1)  # [k, C, M, d]
        return torch.cat([sos.expand(k, -1, -1, -1), ctx, names.expand(k, -1, -1, -1)], dim=2)

    def encode(self, model, tokens, embeddings):
        """CoOp's normalised class features [C, e]."""
        return F.normalize(model.text(tokens, self.embed(embeddings)), dim=-1)

    def similarities(self, model, f, tokens, embeddings, rows=4096):
        """f . g_c [B, C] of normalised image features f [B, e] and the class prompts (from prompts());
        CoCoOp encodes each image's own prompts, as many images per text pass as fit in `rows` prompts."""
        if self.meta_net is None:
            return f @ self.encode(model, tokens, embeddings).T
        C = len(tokens)
        shift = self.meta_net(f)  # [B, d]
        k = max(1, rows // C)
        out = []
        for i in range(0, len(f), k):
            x = self.embed(embeddings, shift[i : i + k])  # [k, C, L', d]
            g = F.normalize(model.text(tokens.repeat(len(x), 1), x.flatten(0, 1)), dim=-1)  # [k C, e]
            out.append(torch.einsum("be,bce->bc", f[i : i + k], g.view(len(x), C, -1)))
        return torch.cat(out)

    def loss(self, model, classnames, tau):
        """The batch loss (net, images, labels, tokens) -> CE(f . g_c / tau) over `classnames`."""
        tokens, embeddings = self.prompts(model, classnames)

        def batch_loss(net, images, labels, _tokens=None):
            f = net(images)[0]
            return F.cross_entropy(self.similarities(model, f, tokens, embeddings).float() / tau, labels)

        return batch_loss

    @torch.no_grad()
    def classifier(self, model, classnames):
        """What evaluate.py scores with: CoOp's [C, e] class features, or for CoCoOp a function from
        normalised image features [B, e] to [B, C]."""
        tokens, embeddings = self.prompts(model, classnames)
        if self.meta_net is None:
            return self.encode(model, tokens, embeddings)
        return lambda f: self.similarities(model, f, tokens, embeddings)


def add_prompt_learner(model, ctx_init="a photo of a", conditional=False):
    """Freeze CLIP and attach model.prompt_learner (CoCoOp's when conditional), the only part that trains."""
    model.requires_grad_(False)
    model.prompt_learner = PromptLearner(model, ctx_init, conditional)
    return model.prompt_learner


def setup(model, cfg, task):
    """--method coop and cocoop (method.py's contract): the context from cfg.ctx_init (CoCoOp: with its
    meta-net) trained with cross-entropy over the task's classes; every evaluation scores the classifier
    its learned prompts give for that evaluation's class names."""
    learner = add_prompt_learner(model, cfg.ctx_init, conditional=cfg.method == "cocoop")
    return Method(
        loss=learner.loss(model, task.classnames, task.tau),
        rows=[(cfg.method, None)],
        classifier_for=lambda classnames: learner.classifier(model, classnames),
    )


RELEASED_NAMES = {"meta_net.linear1.": "meta_net.0.", "meta_net.linear2.": "meta_net.2."}  # CoCoOp release: ours


def released_state(state):
    """A released prompt learner's state dict in our names: CoCoOp's meta-net layers renamed (RELEASED_NAMES),
    the frozen class-name embeddings token_prefix and token_suffix dropped (the release's load_model drops
    them too: they are rebuilt for the classes scored)."""
    out = {}
    for name, tensor in state.items():
        if name not in ("token_prefix", "token_suffix"):
            old = next((old for old in RELEASED_NAMES if name.startswith(old)), None)
            out[RELEASED_NAMES[old] + name.removeprefix(old) if old else name] = tensor
    return out


def load_prompt_learner(model, path):
    """Freeze CLIP and attach the prompt learner saved at `path` as model.prompt_learner: train.py's
    prompt_learner.safetensors, or a released CoOp or CoCoOp checkpoint (Dassl's
    prompt_learner/model.pth.tar-N, read by weight_files.read_inert: no code of the file runs). CoCoOp's
    when it holds a meta-net."""
    try:
        if str(path).endswith(".safetensors"):
            state, metadata = read_state_dict(path)
        else:
            checkpoint, metadata = read_inert(path), {}
            state = released_state(checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint)
    except WeightsError:
        raise
    except Exception as e:  # a damaged file or another format: one line naming it
        raise WeightsError(f"{path}: not a CoOp or CoCoOp prompt learner checkpoint ({cause(e)})") from None
    if not all(isinstance(v, torch.Tensor) for v in state.values()) or "ctx" not in state:
        raise WeightsError(f"{path}: expected a prompt learner's tensors (ctx, and CoCoOp's meta_net)")
    ctx = state["ctx"]
    if ctx.dim() != 2:
        raise WeightsError(f"{path}: context of shape {tuple(ctx.shape)}: class-specific contexts are not supported")
    learner = add_prompt_learner(model, str(len(ctx)), conditional=any(k.startswith("meta_net.") for k in state))
    learner.prefix = metadata.get("prefix", learner.prefix)
    reference = learner.ctx
    try:
        learner.load_state_dict({k: v.to(reference.dtype) for k, v in state.items()})
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not fit this CLIP ({str(e).splitlines()[-1].strip()})") from None
    return learner
