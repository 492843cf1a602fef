"""The DebiasPL core checked against the paper's formulas, recomputed independently in float64."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medseg_dpl.core.debias import (EPS, ResponseEMA, debiased_probs, log_bias,
                                    margin_adjusted_logits, masked_cross_entropy, pseudo_labels)

SHAPES = [(16, 5), (2, 4, 3, 5, 6)]  # (N, C) and (N, C, D, H, W)


def _rand_prob(c: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.rand(c, generator=gen, dtype=torch.float64) + 0.05
    return (p / p.sum()).float()


# ---- float64 references, written from the formulas, not from the implementation ------------

def _ref_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _ref_bias(qhat: np.ndarray, prior: np.ndarray | None, ndim: int) -> np.ndarray:
    b = np.log(np.maximum(qhat.astype(np.float64), EPS))
    if prior is not None:
        b = b - np.log(np.maximum(prior.astype(np.float64), EPS))
    return b.reshape((1, -1) + (1,) * (ndim - 2))


def _ref_positions(x: np.ndarray) -> np.ndarray:
    """(N, C, *) -> (positions, C)."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_prior", [False, True])
def test_debiased_probs_and_margin_match_formula(shape, with_prior):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=gen) * 3
    qhat = _rand_prob(shape[1], gen)
    prior = _rand_prob(shape[1], gen) if with_prior else None
    tau = 0.7
    zn = z.double().numpy()
    pn = prior.numpy() if prior is not None else None
    bias = _ref_bias(qhat.numpy(), pn, z.ndim)

    p = debiased_probs(z, qhat, tau, prior)
    assert p.dtype == torch.float32 and p.shape == z.shape
    np.testing.assert_allclose(p.double().numpy(), _ref_softmax(zn - tau * bias), atol=1e-6)
    np.testing.assert_allclose(p.sum(1).numpy(), 1.0, atol=1e-5)

    m = margin_adjusted_logits(z, qhat, tau, prior)
    assert m.dtype == torch.float32 and m.shape == z.shape
    np.testing.assert_allclose(m.double().numpy(), zn + tau * bias, atol=1e-5)

    np.testing.assert_allclose(log_bias(qhat, prior).double().numpy(), bias.reshape(-1), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_uniform_prior_equals_no_prior(shape):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=gen)
    qhat = _rand_prob(shape[1], gen)
    uniform = torch.full((shape[1],), 1.0 / shape[1])
    torch.testing.assert_close(debiased_probs(z, qhat, 0.5, uniform), debiased_probs(z, qhat, 0.5))
    # The logits differ by the constant τ·log C, which cross-entropy ignores.
    target = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
    torch.testing.assert_close(
        masked_cross_entropy(margin_adjusted_logits(z, qhat, 0.5, uniform), target),
        masked_cross_entropy(margin_adjusted_logits(z, qhat, 0.5), target))


def test_tau_zero_is_plain_softmax_and_debiasing_moves_mass_to_rare_classes():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(64, 4, generator=gen)
    qhat = torch.tensor([0.7, 0.1, 0.1, 0.1])
    torch.testing.assert_close(debiased_probs(z, qhat, 0.0), torch.softmax(z, 1))
    # Class 0 is over-predicted: debiasing must lower its probability everywhere.
    assert (debiased_probs(z, qhat, 1.0)[:, 0] < torch.softmax(z, 1)[:, 0]).all()


def test_zeros_in_qhat_are_clamped():
    z = torch.randn(8, 3, 4)
    qhat = torch.tensor([1.0, 0.0, 0.0])
    for out in (debiased_probs(z, qhat, 1.0), margin_adjusted_logits(z, qhat, 1.0),
                debiased_probs(z, qhat, 1.0, prior=torch.tensor([0.0, 0.5, 0.5])),
                log_bias(qhat)):
        assert torch.isfinite(out).all()
    np.testing.assert_allclose(log_bias(qhat).numpy(), np.log([1.0, EPS, EPS]), rtol=1e-6)


def test_autocast_bf16_input_gives_float32_finite_output():
    gen = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(6, 4)
    x = torch.randn(32, 6, generator=gen)
    qhat = torch.tensor([0.97, 0.01, 0.01, 0.01])  # log q̂ ~ -4.6: bf16 would round margins
    target = torch.randint(0, 4, (32,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        assert z.dtype == torch.bfloat16
        p = debiased_probs(z, qhat, 1.0)
        m = margin_adjusted_logits(z, qhat, 1.0)
        loss = masked_cross_entropy(m, target, p.max(1).values > 0.5)
    for out in (p, m, loss):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    zf = z.detach().double().numpy()
    np.testing.assert_allclose(p.detach().double().numpy(),
                               _ref_softmax(zf - _ref_bias(qhat.numpy(), None, 2)), atol=1e-6)
    np.testing.assert_allclose(m.detach().double().numpy(), zf + _ref_bias(qhat.numpy(), None, 2),
                               atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_pseudo_labels(shape):
    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(shape, generator=gen) * 2, dim=1)
    labels, mask = pseudo_labels(probs, 0.6)
    pn = probs.double().numpy()
    assert labels.dtype == torch.long and mask.dtype == torch.bool
    assert labels.shape == mask.shape == (shape[0],) + shape[2:]
    np.testing.assert_array_equal(labels.numpy(), pn.argmax(1))
    np.testing.assert_array_equal(mask.numpy(), pn.max(1) >= 0.6)
    assert 0 < mask.sum() < mask.numel()  # the threshold really splits this batch
    assert pseudo_labels(probs, 0.0)[1].all() and not pseudo_labels(probs, 1.01)[1].any()


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_cross_entropy_mean_over_all_positions(shape):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(shape, generator=gen)
    target = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
    mask = torch.rand(target.shape, generator=gen) > 0.5
    zn, tn, mn = z.double().numpy(), target.numpy(), mask.numpy()
    logp = np.log(_ref_softmax(zn))
    nll = -np.take_along_axis(logp, tn[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(masked_cross_entropy(z, target, mask).item(),
                               (nll * mn).sum() / nll.size, rtol=1e-5)
    np.testing.assert_allclose(masked_cross_entropy(z, target).item(), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_cross_entropy(z, target, mask.float()).item(),
                               (nll * mn).sum() / nll.size, rtol=1e-5)
    assert masked_cross_entropy(z, target, torch.zeros_like(mask)).item() == 0.0
    # Gradient flows to the logits of the kept positions only.
    zg = z.clone().requires_grad_(True)
    masked_cross_entropy(zg, target, mask).backward()
    grad_norm = zg.grad.abs().sum(1)
    assert (grad_norm[~mask] == 0).all() and (grad_norm[mask] > 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_response_ema_update_matches_formula(shape):
    gen = torch.Generator().manual_seed(6)
    c = shape[1]
    ema = ResponseEMA(c, momentum=0.9)
    np.testing.assert_allclose(ema.qhat.numpy(), np.full(c, 1.0 / c), rtol=1e-6)
    ref = np.full(c, 1.0 / c)
    for _ in range(3):
        probs = torch.softmax(torch.randn(shape, generator=gen) * 2, dim=1)
        ema.update(probs)
        ref = 0.9 * ref + 0.1 * _ref_positions(probs.double().numpy()).mean(0)
        np.testing.assert_allclose(ema.qhat.double().numpy(), ref, atol=1e-6)
    # Masked: the mean is over the masked positions only.
    probs = torch.softmax(torch.randn(shape, generator=gen) * 2, dim=1)
    mask = torch.rand((shape[0],) + shape[2:], generator=gen) > 0.6
    assert 0 < mask.sum() < mask.numel()
    ema.update(probs, mask)
    kept = _ref_positions(probs.double().numpy())[mask.numpy().reshape(-1)]
    ref = 0.9 * ref + 0.1 * kept.mean(0)
    np.testing.assert_allclose(ema.qhat.double().numpy(), ref, atol=1e-6)
    # A (N, 1, *) mask is accepted too.
    ema2 = ResponseEMA(c, momentum=0.9)
    ema2.update(probs, mask.unsqueeze(1))
    np.testing.assert_allclose(ema2.qhat.double().numpy(),
                               0.9 / c + 0.1 * kept.mean(0), atol=1e-6)
    # Empty mask: q̂ unchanged.
    before = ema.qhat.clone()
    ema.update(probs, torch.zeros_like(mask))
    torch.testing.assert_close(ema.qhat, before, rtol=0, atol=0)
    np.testing.assert_allclose(ema.qhat.sum().item(), 1.0, atol=1e-5)


def test_response_ema_rejects_bad_input():
    with pytest.raises(ValueError, match="momentum"):
        ResponseEMA(3, momentum=1.0)
    ema = ResponseEMA(3)
    with pytest.raises(ValueError, match="classes"):
        ema.update(torch.rand(4, 5))
    with pytest.raises(ValueError, match="mask shape"):
        ema.update(torch.rand(4, 3, 2, 2), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="class vector"):
        debiased_probs(torch.randn(4, 3), torch.rand(4), 1.0)


def test_response_ema_state_dict_round_trip():
    ema = ResponseEMA(4, momentum=0.5)
    ema.update(torch.softmax(torch.randn(10, 4), 1))
    state = ema.state_dict()
    assert set(state) == {"qhat"}
    fresh = ResponseEMA(4, momentum=0.5)
    assert not torch.equal(fresh.qhat, ema.qhat)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.qhat, ema.qhat, rtol=0, atol=0)
    # Survives a save/load through torch's safe loader, as checkpoints do.
    import io
    buf = io.BytesIO()
    torch.save({"method": ema.state_dict()}, buf)
    buf.seek(0)
    restored = ResponseEMA(4, momentum=0.5)
    restored.load_state_dict(torch.load(buf, weights_only=True)["method"])
    torch.testing.assert_close(restored.qhat, ema.qhat, rtol=0, atol=0)


# ---- torch.distributed: a real 2-process gloo group ---------------------------------------

def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data (and a different number of kept positions) on each rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    probs = torch.softmax(torch.randn(2 + rank, 3, 2, 3, 2, generator=gen) * 2, dim=1)
    mask = torch.rand((probs.shape[0],) + probs.shape[2:], generator=gen) > 0.3 + 0.3 * rank
    return probs, mask


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        ema = ResponseEMA(3, momentum=0.8)
        probs, mask = _rank_batch(rank)
        ema.update(probs)          # unmasked
        ema.update(probs, mask)    # masked, different counts per rank
        empty = torch.zeros_like(mask) if rank == 0 else mask
        ema.update(probs, empty)   # rank 0 contributes nothing, rank 1 does
        torch.save(ema.qhat.clone(), os.path.join(out_dir, f"qhat{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_response_ema_all_reduce_two_process_gloo(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
             join=True)
    q = [torch.load(tmp_path / f"qhat{r}.pt", weights_only=True) for r in range(world)]
    torch.testing.assert_close(q[0], q[1], rtol=0, atol=0)  # identical on every rank

    batches = [_rank_batch(r) for r in range(world)]
    flat = [_ref_positions(p.double().numpy()) for p, _ in batches]
    masks = [m.numpy().reshape(-1) for _, m in batches]
    ref = np.full(3, 1.0 / 3)
    ref = 0.8 * ref + 0.2 * np.concatenate(flat).mean(0)
    ref = 0.8 * ref + 0.2 * np.concatenate([f[m] for f, m in zip(flat, masks)]).mean(0)
    ref = 0.8 * ref + 0.2 * flat[1][masks[1]].mean(0)
    np.testing.assert_allclose(q[0].double().numpy(), ref, atol=1e-6)
    # The global mean differs from either rank's local mean: the reduce really happened.
    local0 = 0.8 * (0.8 * (0.8 / 3 + 0.2 * flat[0].mean(0)) + 0.2 * flat[0][masks[0]].mean(0))
    assert np.abs(local0 - ref).max() > 1e-3


# ---- voxel-aware additions ---------------------------------------------------------------

def test_organ_only_bias_renormalises_without_background_and_clips():
    q = torch.tensor([0.90, 0.07, 0.02, 0.01])
    pi = torch.tensor([0.80, 0.10, 0.06, 0.04])
    b = log_bias(q, pi, ignore_index=0).double().numpy()
    qo, po = q[1:].double().numpy() / 0.10, pi[1:].double().numpy() / 0.20
    np.testing.assert_allclose(b, [0.0, *np.log(qo / po)], rtol=1e-5)
    clipped = log_bias(q, pi, ignore_index=0, clip=0.3).numpy()
    np.testing.assert_allclose(clipped, [0.0, *np.clip(np.log(qo / po), -0.3, 0.3)], rtol=1e-5)
    # the background's share does not move the organs' biases
    q2 = torch.tensor([0.50, 0.35, 0.10, 0.05])
    np.testing.assert_allclose(log_bias(q2, pi, ignore_index=0).numpy(), b, rtol=1e-5)
    # and a (N, C, D, H, W) logit tensor gets exactly that bias
    z = torch.randn(2, 4, 3, 3, 3)
    p = debiased_probs(z, q, 1.0, pi, ignore_index=0, clip=0.3).double().numpy()
    ref = _ref_softmax(z.double().numpy() - clipped.astype(np.float64).reshape(1, -1, 1, 1, 1))
    np.testing.assert_allclose(p, ref, atol=1e-6)
    m = margin_adjusted_logits(z, q, 2.0, pi, ignore_index=0).double().numpy()
    np.testing.assert_allclose(m, z.double().numpy() + 2 * b.reshape(1, -1, 1, 1, 1), atol=1e-5)


def test_classwise_thresholds_formula_and_floor():
    from medseg_dpl.core.debias import classwise_thresholds
    rate = torch.tensor([0.85, 0.12, 0.03, 0.0])
    prior = torch.tensor([0.80, 0.10, 0.06, 0.04])
    r = rate.double().numpy() / prior.double().numpy()
    beta = r / r.max()
    ref = np.maximum(0.9 * beta / (2 - beta), 0.5)
    got = classwise_thresholds(rate, prior, 0.9, 0.5).double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert got[1] == pytest.approx(0.9) and got[3] == pytest.approx(0.5)  # best-learned: T; unseen: floor


def test_pseudo_labels_with_per_class_thresholds():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.55, 0.45]]).T[None]  # (1, 2, 3)
    labels, mask = pseudo_labels(probs, torch.tensor([0.8, 0.5]))
    assert labels.tolist() == [[0, 1, 0]] and mask.tolist() == [[False, True, False]]


def test_response_ema_starts_at_init():
    init = torch.tensor([0.7, 0.2, 0.1])
    ema = ResponseEMA(3, momentum=0.9, init=init)
    torch.testing.assert_close(ema.qhat, init)
    ema.update(torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(ema.qhat, 0.9 * init + 0.1 * torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="init must have shape"):
        ResponseEMA(3, init=torch.ones(4))


def test_response_ema_update_labels_equals_one_hot_update():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (2, 4, 3, 3), generator=g)
    mask = torch.rand(2, 4, 3, 3, generator=g) > 0.4
    one_hot = torch.nn.functional.one_hot(labels, 5).movedim(-1, 1).float()
    for m in (None, mask):
        a, b = ResponseEMA(5, momentum=0.7), ResponseEMA(5, momentum=0.7)
        a.update(one_hot, m)
        b.update_labels(labels, m)
        torch.testing.assert_close(a.qhat, b.qhat)


def test_class_balanced_cross_entropy_float64_by_hand():
    from medseg_dpl.core.debias import class_balanced_cross_entropy, masked_cross_entropy
    g = torch.Generator().manual_seed(5)
    for shape in [(7, 3), (2, 3, 4, 3, 2)]:          # (N, C) and (N, C, D, H, W)
        z = torch.randn(*shape, generator=g, dtype=torch.float64)
        t = torch.randint(0, 3, (shape[0], *shape[2:]), generator=g)
        t.view(-1)[:3] = torch.tensor([0, 1, 2])
        m = torch.rand(t.shape, generator=g) > 0.3
        m.view(-1)[:3] = True
        ce = -torch.log_softmax(z, 1).gather(1, t[:, None])[:, 0]
        per = [ce[(t == c) & m].mean() for c in range(3) if ((t == c) & m).any()]
        want = torch.stack(per).mean() * m.sum() / m.numel()
        got = class_balanced_cross_entropy(z, t, m)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # one class present: FixMatch's masked CE exactly; nothing kept: 0 with a graph
    z = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.ones(4, 5, dtype=torch.long)
    m = torch.rand(4, 5, generator=g) > 0.5
    assert class_balanced_cross_entropy(z, t, m).item() == pytest.approx(masked_cross_entropy(z, t, m).item())
    zero = class_balanced_cross_entropy(z, t, torch.zeros_like(m))
    zero.backward()
    assert zero.item() == 0.0 and z.grad is not None
