"""prompt_learners.py: CoOp's context and CoCoOp's per-image shift against references built by hand
from the text tower's token-embedding input; what trains; evaluation through evaluate.py and train.py
on CoOp-layout fixtures (tiny CLIP, CPU)."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from test_coop import CLASSES, make_dtd

import claims
import evaluate
import prompt_learners
import train
from clip_model import CLIP, PRESETS, image_transform, tokenize
from clip_weights import save_clip
from data import EvalSet, coop
from zero_shot import zero_shot_classifier

TINY = PRESETS["tiny"]
NAMES = ["dog", "golden retriever", "sea lion"]  # 1, 2 and 2 tokens


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return CLIP(TINY).eval()


def cocoop(seed=0):
    model = tiny_clip(seed)
    learner = prompt_learners.add_prompt_learner(model, "a photo of a", conditional=True)
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx))  # a trained context, far from the words
    return model, learner


def test_text_tower_takes_token_embeddings():
    model = tiny_clip()
    tokens = tokenize(NAMES, TINY.context_length)
    with torch.no_grad():
        assert torch.equal(model.text(tokens, model.text.token_embedding(tokens)), model.text(tokens))


def test_coop_starts_as_the_words_it_is_initialised_from():
    """At step 0 the learned prompt is exactly the hand-written "a photo of a {}." prompt."""
    model = tiny_clip()
    learner = prompt_learners.add_prompt_learner(model, "a photo of a")
    assert learner.ctx.shape == (4, TINY.text_width) and learner.meta_net is None
    tokens, _ = learner.prompts(model, NAMES)
    assert tokens.shape[1] == tokens.argmax(-1).max() + 1 < TINY.context_length  # cut after the longest EOT
    zero_shot = zero_shot_classifier(model, NAMES, ["a photo of a {}."])
    torch.testing.assert_close(learner.classifier(model, NAMES), zero_shot, atol=1e-6, rtol=1e-5)


def test_random_context_of_m_vectors():
    torch.manual_seed(0)
    model = tiny_clip()
    learner = prompt_learners.add_prompt_learner(model, "8")
    assert learner.ctx.shape == (8, TINY.text_width) and learner.prefix == " ".join(["X"] * 8)
    assert 0.015 < learner.ctx.std().item() < 0.025  # N(0, 0.02^2)
    tokens, _ = learner.prompts(model, NAMES)
    assert tokens.shape[1] == 1 + 8 + 2 + 1 + 1  # SOS, 8 context, the longest name, '.', EOT


@pytest.mark.parametrize("rows", [1, 5, 4096])  # one image per text pass, one, all of them
def test_cocoop_batched_similarities_equal_a_per_image_reference(rows):
    model, learner = cocoop()
    f = F.normalize(torch.randn(4, TINY.embed_dim), dim=-1)
    with torch.no_grad():
        got = learner.similarities(model, f, *learner.prompts(model, NAMES), rows=rows)
        tokens = tokenize([f"a photo of a {c}." for c in NAMES], TINY.context_length)  # full length, uncut
        for b in range(len(f)):
            x = model.text.token_embedding(tokens).clone()
            x[:, 1:5] = learner.ctx + learner.meta_net(f[b])  # v_m(x) = v_m + h(f)
            g = F.normalize(model.text(tokens, x), dim=-1)
            torch.testing.assert_close(got[b], g @ f[b], atol=1e-6, rtol=1e-5)
    assert learner.meta_net[0].out_features == TINY.embed_dim // 16  # Linear(e, e/16), ReLU, Linear(e/16, d)
    assert learner.meta_net[2].out_features == TINY.text_width


@pytest.mark.parametrize("conditional", [False, True])
def test_only_the_prompt_learner_trains(conditional):
    model = tiny_clip()
    clip_before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = prompt_learners.add_prompt_learner(model, "a photo of a", conditional)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_learner." + n for n, _ in learner.named_parameters()}
    loss = learner.loss(model, NAMES, tau=0.01)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ctx = learner.ctx.detach().clone()
    loss(model, images, labels).backward()
    optimizer.step()
    assert not torch.equal(learner.ctx, ctx)
    assert all(torch.equal(v, clip_before[k]) for k, v in model.state_dict().items() if k in clip_before)


def test_per_image_classifier_in_evaluate_scores_each_half_among_its_own_classes(tmp_path):
    """CoCoOp through evaluate.score on CoCoOp's base/new split equals scoring each half with a
    learner given that half's class names only (each class's prompt does not depend on the others)."""
    task = coop.build("dtd", str(make_dtd(tmp_path, n_test=3)), eval_transform=image_transform(32))
    _, eval_task = coop.base_new(task)
    model, learner = cocoop()
    got = evaluate.score(model, eval_task, split="base", classifier=learner.classifier(model, CLASSES), workers=0)[0]
    for name, evalset, names in (("base", eval_task.test, CLASSES[:3]), ("new", eval_task.ood[0], CLASSES[3:])):
        images = torch.stack([evalset.dataset[i][0] for i in range(len(evalset.dataset))])
        labels = torch.tensor([evalset.dataset[i][1] for i in range(len(evalset.dataset))])
        with torch.no_grad():
            f = model.encode_image(images, normalize=True)
            sims = learner.similarities(model, f, *learner.prompts(model, names))
        expected = 100 * (sims.argmax(-1) == labels).float().mean().item()
        assert got[name] == pytest.approx(expected)
        correct, _ = evaluate.accuracy(
            model, learner.classifier(model, names), EvalSet(name, evalset.dataset), workers=0
        )
        assert 100 * correct.float().mean().item() == pytest.approx(expected)


def test_coop_and_cocoop_base_to_novel_end_to_end(tmp_path):
    root = make_dtd(tmp_path / "data")
    torch.manual_seed(0)
    save_clip(CLIP(TINY), tmp_path / "tiny.safetensors")
    out = tmp_path / "runs"
    common = ["--data", "dtd", "--data-root", str(root), "--model", str(tmp_path / "tiny.safetensors")]
    common += ["--split", "base", "--shots", "2", "--epochs", "1", "--workers", "0", "--run-dir", str(out)]
    (coop_cfg, cocoop_cfg) = train.parse_args([*common, "--method", "coop,cocoop"])
    assert (coop_cfg.batch_size, coop_cfg.epochs, cocoop_cfg.batch_size) == (32, 1, 1)  # recipes, --epochs given
    train.main([*common, "--method", "zero-shot,coop,cocoop", "--batch-size", "3"])
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"zero-shot", "coop", "cocoop"}
    for r in rows.values():
        assert math.isclose(float(r["hm"]), claims.harmonic_mean(float(r["base"]), float(r["new"])))
    assert int(rows["coop"]["trainable"]) == 4 * TINY.text_width
    assert (out / "cocoop" / "prompt_learner.safetensors").exists()
