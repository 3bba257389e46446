"""CLIPFit and the baselines: what trains (names and counts, tiny and ViT-B/16), the CLIPFit
regulariser, the per-method recipes, and a short run of every method through train.main on a
shrunken toy world (merging LoRA and SSF: test_reparam.py)."""

import csv
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import baselines
import clipfit
import lora
import mpm_nce
import prompt_learners
import recipes
import reparam
import ssf
import train
from clip_model import CLIP, PRESETS, tokenize
from clip_weights import load_clip, save_clip
from data import toy
from methods import METHODS
from zero_shot import zero_shot_classifier

TINY = PRESETS["tiny"]
N_TINY = sum(p.numel() for p in CLIP(TINY).parameters())


def lora_count(cfg, rank):
    """r (4d + 2d) per block: qkv [3d, d] gets A [r, d] + B [3d, r], proj [d, d] gets 2 r d."""
    return rank * 6 * (cfg.vision_layers * cfg.vision_width + cfg.text_layers * cfg.text_width)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_clip(CLIP(TINY), path)
    return path


def fresh_tiny():
    torch.manual_seed(0)
    return CLIP(TINY).eval()


def fake_task(n_classes=3, n_train=30):
    return SimpleNamespace(
        classnames=[f"class{i}" for i in range(n_classes)],
        templates=["a photo of a {}.", "a sketch of a {}."],
        train=range(n_train),
    )


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def setup(method, model, **overrides):
    """The method's setup (methods.METHODS) with its recipe (recipes.py) under TrainConfig's defaults."""
    cfg = train.TrainConfig(**{**recipes.values("imagenet", method), **overrides, "method": method})
    return METHODS[method](model, cfg, train.task_for(cfg, model, fake_task()))


def batch(n=8, classes=3, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, 3, 32, 32), torch.randint(classes, (n,))


# ----------------------------------------------------------- what trains
def clipfit_names(cfg):
    text = {f"text.blocks.{i}.mlp.fc2.bias" for i in range(cfg.text_layers)}
    norms = ["visual.norm_pre", "visual.norm"] + [
        f"visual.blocks.{i}.norm{k}" for i in range(cfg.vision_layers) for k in (1, 2)
    ]
    return text | {f"{n}.{w}" for n in norms for w in ("weight", "bias")}


def lora_names(cfg, towers=("visual", "text")):
    layers = {"visual": cfg.vision_layers, "text": cfg.text_layers}
    return {
        f"{t}.blocks.{i}.attn.{m}.lora_{ab}"
        for t in towers
        for i in range(layers[t])
        for m in ("qkv", "proj")
        for ab in "AB"
    }


def ssf_names(cfg):
    layers = {"visual": cfg.vision_layers, "text": cfg.text_layers}
    ops = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    blocks = {f"{t}.blocks.{i}.{op}" for t in layers for i in range(layers[t]) for op in ops}
    return {f"{n}.{p}" for n in blocks | {"visual.norm_pre", "visual.norm", "text.ln_final"} for p in ("gamma", "beta")}


def cocoop_names():
    return {"prompt_learner.ctx"} | {f"prompt_learner.meta_net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


def cocoop_meta_net(cfg):
    """Linear(e, e/16) and Linear(e/16, d), with biases."""
    hidden = cfg.embed_dim // 16
    return cfg.embed_dim * hidden + hidden + hidden * cfg.text_width + cfg.text_width


def test_clipfit_trains_text_ffn_biases_and_image_layernorms():
    model = fresh_tiny()
    method = setup("clipfit", model)
    assert trainable(model) == clipfit_names(TINY)
    want = TINY.text_layers * TINY.text_width + (1 + 2 * TINY.vision_layers + 1) * 2 * TINY.vision_width
    assert n_trainable(model) == want == clipfit.expected_count(TINY)
    # at step 0 the distillation term is 0: the loss is the CE over its one template ('a photo of a {}.')
    images, labels = batch()
    prompts = tokenize([f"a photo of a class{i}." for i in range(3)], TINY.context_length)
    f, g, _ = model(images, prompts)
    ce = torch.nn.functional.cross_entropy(f @ g.T * model.logit_scale.exp(), labels)  # tau = 1 / s
    torch.testing.assert_close(method.loss(model, images, labels, None), ce)


@pytest.mark.parametrize(
    "method, names, count",
    [
        ("prolip", {"visual.head.weight"}, TINY.embed_dim * TINY.vision_width),
        ("linear-probe", {"classification_head.weight"}, 3 * TINY.embed_dim),
        ("lora", lora_names(TINY), lora_count(TINY, 2)),
        ("ssf", ssf_names(TINY), ssf.expected_count(TINY)),
        ("coop", {"prompt_learner.ctx"}, 4 * TINY.text_width),
        ("cocoop", cocoop_names(), 4 * TINY.text_width + cocoop_meta_net(TINY)),
        ("zero-shot", set(), 0),
    ],
)
def test_baselines_train_exactly_their_parameters(method, names, count):
    model = fresh_tiny()
    setup(method, model, rank=2)
    assert trainable(model) == names and n_trainable(model) == count


def test_flyp_trains_everything_but_the_scale():
    model = fresh_tiny()
    setup("flyp", model)
    assert trainable(model) == {n for n, _ in model.named_parameters()} - {"logit_scale"}


@pytest.mark.parametrize("method", ["full-ft", "wise-ft"])
def test_full_ft_is_wise_ft_end_to_end_image_tower_and_zero_shot_head(method):
    """WiSE-FT's fine-tuning: the image tower and a head at s * the zero-shot classifier, text tower frozen,
    cross-entropy over the head's logits on normalised image features."""
    model = fresh_tiny()
    task = fake_task()
    zs = zero_shot_classifier(model, task.classnames, task.templates)
    fitted = setup(method, model)
    visual = {f"visual.{n}" for n, _ in model.visual.named_parameters()}
    assert trainable(model) == visual | {"classification_head.weight"}
    torch.testing.assert_close(model.classification_head.weight, model.logit_scale.exp() * zs)
    assert fitted.classifier is model.classification_head.weight
    with torch.no_grad():
        model.classification_head.weight.add_(torch.randn_like(zs))  # away from the start
    images, labels = batch()
    logits = model.encode_image(images, normalize=True) @ model.classification_head.weight.T
    torch.testing.assert_close(fitted.loss(model, images, labels, None), F.cross_entropy(logits, labels))


def test_vit_b16_trainable_counts():
    cfg = PRESETS["ViT-B-16"]

    def meta_b16():
        with torch.device("meta"):
            return CLIP(cfg)

    model = clipfit.unfreeze(meta_b16())
    assert trainable(model) == clipfit_names(cfg)
    assert clipfit.count(model) == 12 * 512 + (1 + 2 * 12 + 1) * 2 * 768 == 46_080 == clipfit.expected_count(cfg)
    model = lora.add_lora(meta_b16(), rank=8)
    assert n_trainable(model) == 12 * 6 * 8 * 768 + 12 * 6 * 8 * 512 == 737_280 == lora_count(cfg, 8)
    model = ssf.add_ssf(meta_b16())
    assert trainable(model) == ssf_names(cfg)
    assert n_trainable(model) == 12 * 22 * (768 + 512) + 2 * 2 * 768 + 2 * 512 == 342_016 == ssf.expected_count(cfg)
    for ctx_init, conditional, count in (
        ("a photo of a", False, 2_048),
        ("16", False, 8_192),
        ("a photo of a", True, 35_360),
    ):
        model = meta_b16()
        prompt_learners.add_prompt_learner(model, ctx_init, conditional)
        assert n_trainable(model) == count  # M x 512 context (+ meta-net 512 x 32 + 32 + 32 x 512 + 512)
    model = meta_b16()
    baselines.train_projection(model)
    assert trainable(model) == {"visual.head.weight"} and n_trainable(model) == 768 * 512
    model = baselines.full_finetune(meta_b16())
    assert n_trainable(model) == 149_620_736  # flyp: 149,620,737 parameters, the logit scale frozen
    model = meta_b16()
    baselines.add_classification_head(model, torch.zeros(1000, 512, device="meta"))
    baselines.finetune_image_tower(model)
    assert n_trainable(model) == 86_192_640 + 512_000  # full-ft: the R-Adapter paper's 86.7M


# ------------------------------------------------------------ the losses
def test_clipfit_regularizer_is_zero_at_start_and_grows_after_a_step():
    model = fresh_tiny()
    prompts = tokenize([f"a photo of a class{i}." for i in range(3)], TINY.context_length)
    anchor = clipfit.class_embeddings(model, prompts)
    clipfit.unfreeze(model)
    assert clipfit.regularizer(model.encode_text(prompts, normalize=True), anchor).abs().item() < 1e-6
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    images, labels = batch()
    f, g, _ = model(images, prompts)
    clipfit.loss(f, g, anchor, labels, tau=0.01, lam=8.0).backward()
    optimizer.step()
    reg = clipfit.regularizer(model.encode_text(prompts, normalize=True), anchor)
    assert 0 < reg.item() <= 2


def test_prolip_starts_at_zero_shot_and_weights_its_anchor_by_one_over_n():
    assert baselines.prolip_weight(4, 30, 3) == 1 / 4 and baselines.prolip_weight(None, 30, 3) == 1 / 10
    model = fresh_tiny()
    task = fake_task()
    classifier = zero_shot_classifier(model, task.classnames, task.templates)
    method = setup("prolip", model, shots=4)
    assert trainable(model) == {"visual.head.weight"}
    images, labels = batch()
    f = model.encode_image(images, normalize=True)
    ce = torch.nn.functional.cross_entropy(f @ classifier.T * model.logit_scale.exp(), labels)  # W = W0 at step 0
    torch.testing.assert_close(method.loss(model, images, labels, None), ce)


def randomize(params, seed, std):
    """Add N(0, std^2) noise to each parameter in place: weights away from their starting point."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("lam", [2.0, 8.0])
def test_clipfit_objective_away_from_its_start(lam):
    """L = CE(f . g_c / tau, y) + lambda (1 - mean_c cos(g_c, g_c^0)), g^0 from the zero-shot model, after the
    trainable weights have moved; for two lambdas (8, the default, and 2, the few-shot recipe's)."""
    zero_shot = fresh_tiny()
    model = fresh_tiny()
    method = setup("clipfit", model, clipfit_lambda=lam)
    randomize([p for p in model.parameters() if p.requires_grad], seed=2, std=0.2)
    images, labels = batch()
    prompts = tokenize([f"a photo of a class{i}." for i in range(3)], TINY.context_length)
    with torch.no_grad():
        f, g = model.encode_image(images, normalize=True), model.encode_text(prompts, normalize=True)
        g0 = zero_shot.encode_text(prompts, normalize=True)
    ce = torch.nn.functional.cross_entropy(f @ g.T * model.logit_scale.exp(), labels)  # tau = 1 / s
    distillation = 1 - (g * g0).sum(-1).mean()  # rows are unit vectors: the dot product is the cosine
    assert distillation > 1e-2  # the text side really moved
    torch.testing.assert_close(method.loss(model, images, labels, None), ce + lam * distillation)


def test_prolip_objective_away_from_its_start():
    """L = CE(f W . classifier_c / tau, y) + (1/N) ||W - W0||_F^2 with N = 4 shots, after W has moved."""
    model = fresh_tiny()
    W0 = model.visual.head.weight.detach().clone()
    task = fake_task()
    classifier = zero_shot_classifier(model, task.classnames, task.templates)
    method = setup("prolip", model, shots=4)
    randomize([model.visual.head.weight], seed=3, std=0.05)
    images, labels = batch()
    with torch.no_grad():
        f = model.encode_image(images, normalize=True)
    ce = torch.nn.functional.cross_entropy(f @ classifier.T * model.logit_scale.exp(), labels)
    anchor = ((model.visual.head.weight - W0) ** 2).sum() / 4
    assert anchor > 1e-2 * ce  # a term the comparison below can see
    torch.testing.assert_close(method.loss(model, images, labels, None), ce + anchor)


def test_wise_ft_interpolates_every_tensor_at_alpha():
    """Inside baselines.wise_ft(model, theta_zs, 0.3) every tensor is 0.3 theta_ft + 0.7 theta_zs; after
    the block the fine-tuned weights are back, bit for bit."""
    zero_shot = baselines.snapshot(fresh_tiny())
    model = fresh_tiny()
    randomize(model.parameters(), seed=4, std=0.05)
    finetuned = baselines.snapshot(model)
    floats = [k for k, v in finetuned.items() if v.is_floating_point()]
    assert all(not torch.equal(finetuned[k], zero_shot[k]) for k in floats)
    with baselines.wise_ft(model, zero_shot, 0.3):
        inside = model.state_dict()
        for k in floats:
            torch.testing.assert_close(inside[k], 0.3 * finetuned[k] + 0.7 * zero_shot[k], msg=k)
    after = model.state_dict()
    assert after.keys() == finetuned.keys() and all(torch.equal(after[k], finetuned[k]) for k in after)


def test_lora_merged_weight_is_w_plus_alpha_scale_b_a():
    """At a non-zero B, each merged Linear holds W + alpha scale B A (scale 0.5, alpha 0.6) and keeps its bias."""
    model = lora.add_lora(fresh_tiny(), rank=4, scale=0.5)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    randomize([m.lora_B for m in layers.values()], seed=5, std=0.05)
    expected = {n: (m.weight + 0.6 * 0.5 * m.lora_B @ m.lora_A).detach() for n, m in layers.items()}
    biases = {n: m.bias.detach().clone() for n, m in layers.items()}
    with reparam.merged(model.eval(), 0.6):
        merged = dict(model.named_modules())
        for n, W in expected.items():
            assert type(merged[n]) is torch.nn.Linear
            torch.testing.assert_close(merged[n].weight, W, msg=n)
            assert torch.equal(merged[n].bias, biases[n]), n
    assert len(expected) == 2 * (TINY.vision_layers + TINY.text_layers)


def test_linear_probe_starts_at_the_zero_shot_classifier():
    model = fresh_tiny()
    method = setup("linear-probe", model)
    task = fake_task()
    zs = zero_shot_classifier(model, task.classnames, task.templates)
    torch.testing.assert_close(method.classifier, model.logit_scale.exp() * zs)
    assert method.classifier is model.classification_head.weight


# ----------------------------------------------------- recipes and schedule
def test_method_recipes_fill_flags_not_given(tiny_path):
    base = ["--model", str(tiny_path), "--data", "imagenet", "--data-root", "x"]
    fit, ra, lora, flyp = train.parse_args(base + ["--method", "clipfit,r-adapter,lora,flyp"])
    assert (fit.optimizer, fit.lr, fit.batch_size, fit.warmup_epochs, fit.warmup_lr, fit.loss, fit.flip) == (
        "sgd",
        0.002,
        32,
        1,
        1e-5,
        "ce",
        True,
    )
    assert fit.clipfit_lambda == 8 and fit.epochs == 10
    assert (ra.optimizer, ra.lr, ra.batch_size, ra.loss, ra.rank) == ("adamw", 5e-4, 512, "mpm-nce", None)
    assert lora.rank == 8 and flyp.loss == "infonce"
    fit, lora = train.parse_args(
        base + ["--method", "clipfit,lora", "--lr", "0.01", "--batch-size", "64", "--rank", "2"]
    )
    assert (fit.lr, fit.batch_size, fit.optimizer) == (0.01, 64, "sgd")  # given flags win
    assert lora.rank == 2
    (toy,) = train.parse_args(["--method", "clipfit"])  # the toy budget is the same for every method
    assert (toy.batch_size, toy.epochs, toy.optimizer) == (128, 2, "sgd")
    for bad in (["--method", "clipfit", "--loss", "infonce"], ["--explicit", "lr"], ["--method", "clipfit2"]):
        with pytest.raises(SystemExit):
            train.parse_args(base + bad)


@pytest.mark.parametrize("warm, min_lr", [(1, 0.0), (2, 1e-4), (None, 0.0)])
def test_dassl_schedule_is_a_constant_warmup_then_torchs_cosine_stepped_per_epoch(warm, min_lr):
    """--schedule dassl against an independent computation: during the warm-up epochs the constant warm-up
    rate; after them torch's CosineAnnealingLR(T_max=epochs, eta_min=min_lr), started at the first epoch
    after the warm-up and stepped once at the end of each epoch, its rate held for every step of the epoch."""
    epochs, per_epoch = 10, 3
    cfg = train.TrainConfig(
        lr=0.002, min_lr=min_lr, schedule="dassl", warmup_epochs=warm, warmup_lr=1e-5, epochs=epochs, warmup=7
    )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_lr)
    expected = []
    for epoch in range(epochs):
        if epoch < (warm or 0):
            expected += [1e-5] * per_epoch
            continue
        expected += cosine.get_last_lr() * per_epoch
        optimizer.step()
        cosine.step()
    got = [train.lr_at(step, epochs * per_epoch, cfg) for step in range(epochs * per_epoch)]
    assert got == pytest.approx(expected, rel=1e-9, abs=0)
    assert got[-1] > min_lr + 1e-5  # the last epoch's rate: the cosine never reaches min_lr


def test_constant_warmup_then_cosine():
    cfg = train.TrainConfig(lr=0.002, min_lr=0.0, warmup=5, warmup_lr=1e-5)
    assert [train.lr_at(s, 105, cfg) for s in range(5)] == [1e-5] * 5
    assert train.lr_at(5, 105, cfg) == 0.002 and train.lr_at(105, 105, cfg) == pytest.approx(0.0)
    assert train.lr_at(0, 105, train.TrainConfig(lr=1.0, warmup=4)) == 0.25  # the linear ramp


# ------------------------------------------------- every method, end to end
def test_every_method_trains_and_evaluates_through_main(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setitem(toy.SIZES, "train_per_class", 4)  # 48 training images, 2 steps of 24
    monkeypatch.setitem(toy.SIZES, "test_per_class", 2)
    methods = ["zero-shot", "clipfit", "linear-probe", "flyp", "prolip", "lora", "wise-ft", "ssf", "coop", "cocoop"]
    run_dir = tmp_path / "runs"
    train.main(
        [
            "--model",
            str(tiny_path),
            "--data",
            "toy",
            "--method",
            ",".join(methods),
            "--max-steps",
            "2",
            "--batch-size",
            "24",
            "--warmup-epochs",
            "0",
            "--workers",
            "0",
            "--run-dir",
            str(run_dir),
        ]
    )
    with open(run_dir / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {
        "zero-shot",
        "clipfit",
        "linear-probe",
        "flyp",
        "prolip",
        "LoRA (α=1)",
        "WiSE-FT (α=1)",
        "WiSE-FT (α=0.5)",
        "SSF (α=1)",
        "coop",
        "cocoop",
    }
    full = N_TINY - 1  # all but the logit scale
    image_tower = sum(p.numel() for p in fresh_tiny().visual.parameters())
    assert {k: int(r["trainable"]) for k, r in rows.items()} == {
        "zero-shot": 0,
        "clipfit": clipfit.expected_count(TINY),
        "linear-probe": 12 * TINY.embed_dim,
        "prolip": TINY.embed_dim * TINY.vision_width,
        "LoRA (α=1)": lora_count(TINY, 8),
        "SSF (α=1)": ssf.expected_count(TINY),
        "coop": 4 * TINY.text_width,
        "cocoop": 4 * TINY.text_width + cocoop_meta_net(TINY),
        "flyp": full,
        "WiSE-FT (α=1)": image_tower + 12 * TINY.embed_dim,
        "WiSE-FT (α=0.5)": image_tower + 12 * TINY.embed_dim,
    }
    assert all(0 <= float(r["ood_avg"]) <= 100 for r in rows.values())
    assert (run_dir / "alpha_sweep.png").exists()  # wise-ft always sweeps
    assert (run_dir / "linear-probe" / "head.safetensors").exists()
    for method, names in (("coop", {"ctx"}), ("cocoop", {n.removeprefix("prompt_learner.") for n in cocoop_names()})):
        assert set(load_file(run_dir / method / "prompt_learner.safetensors")) == names

    base = dict(load_clip(tiny_path).named_parameters())
    for method, may_change in [
        ("clipfit", clipfit_names(TINY)),
        ("prolip", {"visual.head.weight"}),
        ("lora", {n for n in base if re.search(r"attn\.(qkv|proj)\.weight$", n)}),
        ("ssf", {n.replace(".gamma", ".weight").replace(".beta", ".bias") for n in ssf_names(TINY)}),
    ]:
        tuned = dict(load_clip(run_dir / method / "merged.safetensors").named_parameters())
        changed = {n for n in base if not torch.equal(base[n], tuned[n])}
        assert changed and changed <= may_change, method


def test_in_random_templates_draws_for_the_global_batch():
    """Each label's class in some template; the ranks' slices are the single process's draw."""
    T, C, L = 5, 4, 7
    prompts = torch.arange(T * C * L).view(T, C, L)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    torch.manual_seed(0)
    one = mpm_nce.in_random_templates(prompts, labels)
    assert one.shape == (6, L)
    for row, label in zip(one, labels):  # row = prompts[t, label] for some template t
        assert any(torch.equal(row, prompts[t, label]) for t in range(T))
    ranks = []
    for ddp_rank in range(2):
        torch.manual_seed(0)  # every rank draws as rank 0 does (distributed.shared_randint)
        ranks.append(mpm_nce.in_random_templates(prompts, labels[3 * ddp_rank : 3 * ddp_rank + 3], (ddp_rank, 2)))
    assert torch.equal(torch.cat(ranks), one)
