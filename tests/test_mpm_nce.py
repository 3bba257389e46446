import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mpm_nce import gather_features, infonce_loss, mpm_nce_loss, soft_targets

FAST = settings(max_examples=30, deadline=None)


def make_batch(seed, B, D=6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, D, generator=gen, dtype=dtype), torch.randn(B, D, generator=gen, dtype=dtype))


labels_st = st.lists(st.integers(0, 3), min_size=1, max_size=8)


def loop_mpm_nce(image, text, labels, tau, delta, epsilon):
    """Sec. 3.4 written out with Python loops in float64, independent of mpm_nce.py."""
    B = len(labels)
    f = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in image.double().tolist()]
    g = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in text.double().tolist()]

    def target(a, b):  # target of anchor a on candidate b
        n_pos = sum(labels[a] == labels[k] for k in range(B))
        if labels[a] == labels[b]:
            return (1 - epsilon) / n_pos if n_pos < B else 1 / n_pos
        return epsilon / (B - n_pos)

    def z(i, j):  # image i vs text j
        dot = sum(a * b for a, b in zip(f[i], g[j]))
        return (dot + (0 if labels[i] == labels[j] else delta)) / tau

    def ce(logits, targets):
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        return -sum(t * (v - lse) for t, v in zip(targets, logits))

    # image i over texts j; text j over images i (anchored on j's own positives)
    i2t = sum(ce([z(i, j) for j in range(B)], [target(i, j) for j in range(B)]) for i in range(B))
    t2i = sum(ce([z(i, j) for i in range(B)], [target(j, i) for i in range(B)]) for j in range(B))
    return (i2t / B + t2i / B) / 2


def clip_loss(image, text, tau):
    """CLIP's pseudo-code (Radford et al. 2021, Fig. 3), float64."""
    f, g = F.normalize(image.double(), dim=1), F.normalize(text.double(), dim=1)
    logits = f @ g.T / tau
    target = torch.arange(len(f))
    return ((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2).item()


@FAST
@given(
    labels=labels_st,
    seed=st.integers(0, 2**16),
    tau=st.floats(0.01, 1.0),
    delta=st.floats(-0.2, 0.5),
    epsilon=st.floats(0.0, 0.9),
)
def test_matches_loop_reference(labels, seed, tau, delta, epsilon):
    image, text = make_batch(seed, len(labels), dtype=torch.float64)
    got = mpm_nce_loss(image, text, torch.tensor(labels), tau=tau, delta=delta, epsilon=epsilon)
    want = loop_mpm_nce(image, text, labels, tau, delta, epsilon)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-4)


@FAST
@given(B=st.integers(1, 8), seed=st.integers(0, 2**16), tau=st.floats(0.01, 1.0))
def test_distinct_labels_is_clip_infonce(B, seed, tau):
    image, text = make_batch(seed, B)
    labels = torch.randperm(B, generator=torch.Generator().manual_seed(seed)) * 7
    want = clip_loss(image, text, tau)
    mpm = mpm_nce_loss(image, text, labels, tau=tau, delta=0.0, epsilon=0.0)
    assert mpm.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert infonce_loss(image, text, tau=tau).item() == pytest.approx(want, rel=1e-5, abs=1e-5)


@FAST
@given(labels=labels_st, epsilon=st.floats(0.0, 0.99, exclude_max=True))
def test_soft_targets_rows_sum_to_one(labels, epsilon):
    labels = torch.tensor(labels)
    t = soft_targets(labels, epsilon)
    B = len(labels)
    assert t.shape == (B, B) and (t >= 0).all()
    torch.testing.assert_close(t.sum(dim=1), torch.ones(B))
    y = labels[:, None] == labels[None, :]
    has_neg = (~y).any(dim=1)
    # positives share 1 - epsilon (all of it in a row without negatives)
    pos_mass = (t * y).sum(dim=1)
    torch.testing.assert_close(pos_mass, torch.where(has_neg, 1 - epsilon, 1.0).float())


def test_soft_targets_formula_small_case():
    t = soft_targets(torch.tensor([0, 0, 1]), epsilon=0.1)
    want = torch.tensor([[0.45, 0.45, 0.1], [0.45, 0.45, 0.1], [0.05, 0.05, 0.9]])
    torch.testing.assert_close(t, want)


@FAST
@given(labels=labels_st, seed=st.integers(0, 2**16))
def test_loss_increases_with_delta(labels, seed):
    image, text = make_batch(seed, len(labels))
    labels_t = torch.tensor(labels)
    deltas = [-0.1, 0.0, 0.05, 0.1, 0.2, 0.4]
    # strictly increasing when some pair is a negative (epsilon = 0); tau = 0.5 keeps the
    # negatives' softmax mass, hence the increase, well above fp32 resolution
    losses = [mpm_nce_loss(image, text, labels_t, tau=0.5, delta=d).item() for d in deltas]
    if len(set(labels)) > 1:
        assert all(a < b for a, b in zip(losses, losses[1:])), losses
    else:  # no negatives: the margin never applies
        assert losses == pytest.approx([losses[0]] * len(losses))
    # non-strict at the paper's tau, where far negatives can vanish in fp32
    losses = [mpm_nce_loss(image, text, labels_t, delta=d).item() for d in deltas]
    assert all(a <= b * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gradients_finite_and_fp32(dtype):
    torch.manual_seed(0)
    image_net, text_net = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    x = torch.randn(12, 16)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    try:
        with torch.autocast("cpu", dtype=dtype):
            image, text = image_net(x), text_net(x)
            loss = mpm_nce_loss(image, text, labels, epsilon=0.02)
    except RuntimeError as e:
        pytest.skip(f"CPU autocast does not support {dtype}: {e}")
    if image.dtype != dtype:
        pytest.skip(f"CPU autocast does not cast Linear to {dtype}")
    assert loss.dtype == torch.float32
    # the logits really are computed in fp32: same value as on the upcast features
    want = mpm_nce_loss(image.detach().float(), text.detach().float(), labels, epsilon=0.02)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)
    loss.backward()
    for p in [*image_net.parameters(), *text_net.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@FAST
@given(labels=labels_st, seed=st.integers(0, 2**16), epsilon=st.floats(0.0, 0.5))
def test_permutation_invariant(labels, seed, epsilon):
    image, text = make_batch(seed, len(labels))
    labels = torch.tensor(labels)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 1))
    a = mpm_nce_loss(image, text, labels, epsilon=epsilon)
    b = mpm_nce_loss(image[perm], text[perm], labels[perm], epsilon=epsilon)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("B", [1, 2, 7])
def test_all_positive_batch_is_finite(B):
    image, text = make_batch(0, B)
    image.requires_grad_(True)
    labels = torch.full((B,), 3)
    loss = mpm_nce_loss(image, text, labels, epsilon=0.02)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all()
    torch.testing.assert_close(soft_targets(labels, 0.02), torch.full((B, B), 1 / B))
    # every pair is positive: uniform targets, no margin, so the loss ignores epsilon and delta
    other = mpm_nce_loss(image, text, labels, delta=0.3)
    assert loss.item() == pytest.approx(other.item(), rel=1e-6)


def test_bad_inputs_raise():
    image, text = make_batch(0, 4)
    labels = torch.arange(4)
    with pytest.raises(ValueError, match="features"):
        mpm_nce_loss(image, text[:3], labels)
    with pytest.raises(ValueError, match="features"):
        mpm_nce_loss(image[0], text[0], labels)
    with pytest.raises(ValueError, match="labels"):
        mpm_nce_loss(image, text, labels[:3])
    with pytest.raises(ValueError, match="labels"):
        mpm_nce_loss(image, text, labels[:, None])
    with pytest.raises(ValueError, match="tau"):
        mpm_nce_loss(image, text, labels, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        infonce_loss(image, text, tau=-1.0)
    for epsilon in [-0.1, 1.0]:
        with pytest.raises(ValueError, match="epsilon"):
            mpm_nce_loss(image, text, labels, epsilon=epsilon)


def test_gather_is_identity_without_distributed():
    image, text = make_batch(0, 4)
    labels = torch.arange(4)
    out = gather_features(image, text, labels)
    assert out[0] is image and out[1] is text and out[2] is labels


# --- distributed: 2 gloo processes, each holding half of the batch ---------------------

WORLD = 2
DIST_LABELS = [0, 1, 0, 2, 1, 1, 3, 0]  # positives span both halves


def _dist_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    image, text = make_batch(0, len(DIST_LABELS))
    labels = torch.tensor(DIST_LABELS)
    b = len(labels) // WORLD
    local = slice(rank * b, (rank + 1) * b)
    image, text = image[local].clone().requires_grad_(), text[local].clone().requires_grad_()
    loss = mpm_nce_loss(*gather_features(image, text, labels[local]), epsilon=0.02)
    loss.backward()
    out = {"loss": loss.detach(), "image": image.grad, "text": text.grad}
    torch.save(out, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_gather_features_two_process_gloo(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    image, text = make_batch(0, len(DIST_LABELS))
    image.requires_grad_(), text.requires_grad_()
    loss = mpm_nce_loss(image, text, torch.tensor(DIST_LABELS), epsilon=0.02)
    loss.backward()
    b = len(DIST_LABELS) // WORLD
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"{rank}.pt")
        local = slice(rank * b, (rank + 1) * b)
        # every rank computes the single-process loss of the global batch ...
        torch.testing.assert_close(out["loss"], loss.detach())
        # ... and receives WORLD copies of its slice of the global gradient (all_gather's
        # backward sums over ranks), which DDP's 1/WORLD gradient averaging cancels
        torch.testing.assert_close(out["image"], WORLD * image.grad[local])
        torch.testing.assert_close(out["text"], WORLD * text.grad[local])
