"""prompt_learners.py: CoOp's context and CoCoOp's per-image shift against references built by hand
from the text tower's token-embedding input; what trains; evaluation through evaluate.py and train.py
on CoOp-layout fixtures (tiny CLIP, CPU)."""

import csv
import math
import pickle

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
    assert coop_cfg.seeds == cocoop_cfg.seeds == 3  # the release's seeds 1, 2, 3; one here
    train.main([*common, "--method", "zero-shot,coop,cocoop", "--batch-size", "3", "--seeds", "1"])
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"zero-shot", "coop", "cocoop"}
    for r in rows.values():
        assert math.isclose(float(r["hm"]), claims.harmonic_mean(float(r["base"]), float(r["new"])))
    assert int(rows["coop"]["trainable"]) == 4 * TINY.text_width
    for method in ("coop", "cocoop"):  # the exported context, loaded by evaluate.py, scores as in training
        learner = out / method / "prompt_learner.safetensors"
        evaluate.main(
            ["--model", str(tmp_path / "tiny.safetensors"), "--prompt-learner", str(learner), "--data", "dtd"]
            + ["--data-root", str(root), "--split", "base", "--workers", "0", "--out", str(tmp_path / method)]
        )
        with open(tmp_path / method / "results.csv") as f:
            (row,) = csv.DictReader(f)
        assert [float(row[k]) for k in ("base", "new")] == [float(rows[method][k]) for k in ("base", "new")]


class Payload:
    """Unpickling this runs open(marker, 'w'): any code that ran leaves the marker file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_released_checkpoints_load(tmp_path):
    """A checkpoint as the CoOp release's Dassl trainer writes it (prompt_learner/model.pth.tar-N: the state
    dict with CoCoOp's meta-net as linear1 / linear2 in fp16 and the class-name buffers token_prefix /
    token_suffix, next to the optimizer's and the scheduler's pickled state) loads with no code of the file
    running, and its learner scores as the one it was saved from."""
    model, learner = cocoop()
    names = {"0": "linear1", "2": "linear2"}  # the release's nn.Sequential(OrderedDict(linear1, relu, linear2))
    state = {"ctx": learner.ctx.detach().clone(), "token_prefix": torch.randn(3, 1, 8), "token_suffix": torch.randn(3)}
    for name, tensor in learner.meta_net.state_dict().items():
        index, kind = name.split(".")
        state[f"meta_net.{names[index]}.{kind}"] = tensor.half()  # PREC fp16
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    marker = tmp_path / "pwned"
    checkpoint = {"state_dict": state, "epoch": 10, "optimizer": optimizer.state_dict(), "val_result": None}
    checkpoint["scheduler"] = {"successor": scheduler, "warmup_epoch": 1, "cons_lr": 1e-5, "hook": Payload(marker)}
    path = tmp_path / "model.pth.tar-10"
    torch.save(checkpoint, path)
    with pytest.raises(pickle.UnpicklingError):  # objects besides tensors: torch.load's safe mode refuses it
        torch.load(path, weights_only=True)
    fresh = tiny_clip()
    loaded = prompt_learners.load_prompt_learner(fresh, path)
    assert not marker.exists() and loaded.meta_net is not None and fresh.prompt_learner is loaded
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if not n.startswith("prompt_learner."))
    with torch.no_grad():
        learner.meta_net.load_state_dict({k: v.half().float() for k, v in learner.meta_net.state_dict().items()})
        f = F.normalize(torch.randn(5, TINY.embed_dim), dim=-1)
        expected = learner.similarities(model, f, *learner.prompts(model, NAMES))
        got = loaded.similarities(fresh, f, *loaded.prompts(fresh, NAMES))
    torch.testing.assert_close(got, expected)
    coop_state = {"state_dict": {"ctx": torch.randn(16, TINY.text_width), "token_prefix": torch.zeros(1)}}
    torch.save(coop_state, tmp_path / "coop.pth.tar-50")
    coop_learner = prompt_learners.load_prompt_learner(tiny_clip(), tmp_path / "coop.pth.tar-50")
    assert coop_learner.meta_net is None and torch.equal(coop_learner.ctx, coop_state["state_dict"]["ctx"])


def test_a_checkpoint_that_is_no_prompt_learner_is_one_line(tmp_path):
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(prompt_learners.WeightsError, match=f"{junk}: not a CoOp or CoCoOp prompt learner checkpoint"):
        prompt_learners.load_prompt_learner(tiny_clip(), junk)
    torch.save({"state_dict": {"ctx": torch.randn(16, TINY.text_width + 1)}}, tmp_path / "wide.pth")
    with pytest.raises(prompt_learners.WeightsError, match="does not fit this CLIP"):
        prompt_learners.load_prompt_learner(tiny_clip(), tmp_path / "wide.pth")
