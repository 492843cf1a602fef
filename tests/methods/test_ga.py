"""GA loss (GADice + GACE) in float64 against hand-computed values and an independent
reference; ``loss.name=ga``; the ga method's step wiring and a 2-step training."""
import math

import pytest
import torch
import torch.nn.functional as F

from medseg_dpl.config import ConfigError, load_config
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.methods.losses import (ga_ce_loss, ga_ce_parts, ga_dice_loss, ga_dice_terms, ga_loss,
                                       supervised_loss)

from train_helpers import build_algo

C = 4
D64 = torch.float64
# 4 voxels, 3 classes, class 2 absent from the target; logits log p so that softmax = p
P = torch.tensor([[.7, .2, .1], [.5, .3, .2], [.2, .6, .2], [.1, .5, .4]], dtype=D64)
T = torch.tensor([0, 0, 1, 1])


# ------------------------------------------------------------------------------ references
def gadice_by_hand(z, t):
    """(M, C) logits, (M,) labels: the per-class GADice written out with a class loop."""
    p, out = torch.softmax(z, 1), []
    for c in range(z.shape[1]):
        pc, yc = p[:, c], (t == c).to(p.dtype)
        if yc.sum() > 0:
            out.append(1 - (2 * (pc * yc).sum() + 1e-10) / ((pc ** 2).sum() + (yc ** 2).sum() + 1e-10))
        else:
            out.append((pc ** 2).sum() / len(t))
    return torch.stack(out)


def gace_by_hand(z, t, k, gamma):
    """(M, C) logits, (M,) labels: top-K by a stable descending sort (ties: first index)."""
    ce = -torch.log_softmax(z, 1).gather(1, t[:, None])[:, 0]
    K = int(len(t) * k / 100)
    top = torch.sort(ce, descending=True, stable=True).indices[:K]
    loss = 0.0
    for c in range(z.shape[1]):
        sel = top[t[top] == c]
        if len(sel):
            loss = loss + ce[sel].sum() / (len(sel) ** (1 - gamma) * K ** gamma)
    return loss


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], C, *shape[1:], generator=g, dtype=D64),
            torch.randint(0, C, shape, generator=g))


# ------------------------------------------------------------------------------ GADice
def test_gadice_by_hand_with_an_absent_class():
    terms = ga_dice_terms(torch.log(P), T)
    want = [1 - 2.4 / 2.79, 1 - 2.2 / 2.74, 0.25 / 4]     # Σp² = .79, .74; absent: Σp²/M
    assert terms.dtype == D64
    assert terms.tolist() == pytest.approx(want, rel=1e-9)
    assert ga_dice_loss(torch.log(P), T).item() == pytest.approx(sum(want) / 3, rel=1e-9)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=D64)             # class weights: per-term factor, / C
    assert ga_dice_loss(torch.log(P), T, weight=w).item() == pytest.approx(
        (want[0] + 2 * want[1] + 3 * want[2]) / 3, rel=1e-9)


def test_gadice_absent_class_gradient_has_beta_detached():
    z = torch.log(P).requires_grad_()
    ga_dice_terms(z, T)[2].backward()
    p2 = P[:, 2]
    # d/dp = β = p/M (not 2p/M); through softmax dp2/dz_j = p2 (δ_2j − p_j)
    want = (p2 / 4 * p2)[:, None] * (torch.eye(3, dtype=D64)[2] - P)
    assert torch.allclose(z.grad, want, atol=1e-12)


def test_gadice_pools_the_batch_and_masks_voxels():
    z, t = _rand((2, 3, 4, 2), 1)
    t[0][t[0] == 3] = 1                                      # class 3 only in crop 2: present (pooled)
    flat_z, flat_t = z.movedim(1, -1).reshape(-1, C), t.reshape(-1)
    assert torch.allclose(ga_dice_terms(z, t), gadice_by_hand(flat_z, flat_t), atol=1e-12)
    mask = torch.rand(t.shape, generator=torch.Generator().manual_seed(2)) > 0.4
    keep = mask.reshape(-1)
    assert torch.allclose(ga_dice_terms(z, t, mask), gadice_by_hand(flat_z[keep], flat_t[keep]), atol=1e-12)
    assert torch.allclose(ga_dice_terms(z, t, mask.double()), ga_dice_terms(z, t, mask))
    assert ga_dice_loss(z, t, torch.zeros_like(mask)).item() == 0.0    # nothing kept: 0, not NaN


# ------------------------------------------------------------------------------ GACE
def test_gace_by_hand():
    # CE of the 4 voxels: −ln .7, −ln .5, −ln .6, −ln .5; k = 75 -> K = 3: the voxels 1, 3, 2
    # (−ln .5 twice, then −ln .6): classes 0, 1, 1 -> n = (1, 2, 0)
    for gamma in (0.5, 0.0, 1.0):
        terms, n = ga_ce_parts(torch.log(P), T, k=75, gamma=gamma)
        a, b = -math.log(.5), -math.log(.6)
        want = [a / (1 * 3 ** gamma), (a + b) / (2 ** (1 - gamma) * 3 ** gamma), 0.0]
        assert terms.tolist() == pytest.approx(want, rel=1e-12) and n.tolist() == [1, 2, 0]
    # γ = 1, k = 100: the plain mean CE
    assert ga_ce_loss(torch.log(P), T, k=100, gamma=1.0).item() == pytest.approx(
        F.cross_entropy(torch.log(P), T).item(), rel=1e-12)


def test_gace_top_k_tie_takes_the_first_voxels():
    # voxels 1-3 have equal logits, so equal CE ln 3 whatever their class; K = 2 of 5
    z = torch.tensor([[0, 0, 5], [0, 0, 0], [0, 0, 0], [0, 0, 0], [5, 0, 0]], dtype=D64)
    ce0 = math.log(2 + math.exp(5))
    terms, n = ga_ce_parts(z, torch.tensor([0, 0, 1, 2, 0]), k=40, gamma=0.5)
    assert n.tolist() == [2, 0, 0] and terms.tolist() == pytest.approx([(ce0 + math.log(3)) / 2, 0, 0])
    terms, n = ga_ce_parts(z, torch.tensor([0, 2, 1, 0, 0]), k=40, gamma=0.5)
    assert n.tolist() == [1, 0, 1]
    assert terms.tolist() == pytest.approx([ce0 / 2 ** 0.5, 0, math.log(3) / 2 ** 0.5])
    # ties=topk (the code's): some K of the tied voxels, the total count still K
    _, n = ga_ce_parts(z, torch.tensor([0, 2, 1, 0, 0]), k=40, ties="topk")
    assert n.sum() == 2 and n[0] >= 1
    with pytest.raises(ValueError, match="ga.ties"):
        ga_ce_loss(z, torch.tensor([0, 2, 1, 0, 0]), ties="random")


@pytest.mark.parametrize("k,gamma", [(10, 0.5), (37.5, 0.3), (100, 0.5)])
def test_gace_shapes_and_mask_against_reference(k, gamma):
    z, t = _rand((2, 6, 5, 4), 3)
    flat_z, flat_t = z.movedim(1, -1).reshape(-1, C), t.reshape(-1)
    want = gace_by_hand(flat_z, flat_t, k, gamma)
    assert ga_ce_loss(z, t, k=k, gamma=gamma).item() == pytest.approx(want.item(), rel=1e-12)
    assert ga_ce_loss(flat_z, flat_t, k=k, gamma=gamma).item() == pytest.approx(want.item(), rel=1e-12)
    mask = torch.rand(t.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    keep = mask.reshape(-1)
    want_m = gace_by_hand(flat_z[keep], flat_t[keep], k, gamma)        # K from the kept voxels
    assert ga_ce_loss(z, t, mask, k=k, gamma=gamma).item() == pytest.approx(want_m.item(), rel=1e-12)


def test_gace_class_weight_scales_the_voxel_loss_and_tiny_k_gives_zero():
    z, t = _rand((1, 3, 3, 3), 5)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=D64)
    ce = F.cross_entropy(z, t, weight=w, reduction="none")            # w_y · CE, as the code's GACE
    assert ga_ce_loss(z, t, weight=w, k=100, gamma=1.0).item() == pytest.approx(ce.mean().item(), rel=1e-12)
    assert ga_ce_loss(z, t, k=1).item() == 0.0                         # K = ⌊27/100⌋ = 0


def test_ga_loss_is_gace_plus_gadice_and_a_shared_loss_name():
    z, t = _rand((2, 4, 4, 4), 6)
    total = ga_loss(z, t)
    assert total.item() == pytest.approx((ga_ce_loss(z, t) + ga_dice_loss(z, t)).item(), rel=1e-12)
    assert supervised_loss(z, t, "ga").item() == pytest.approx(total.item(), rel=1e-12)
    z.requires_grad_()
    ga_loss(z.float(), t).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target"):
        ga_loss(z, t[:, :2])


# ------------------------------------------------------------------------------ methods
def _cfg(*ov):
    return load_config(None, ["model.channels=[4,8]", "model.strides=[2]", "method.cutmix=0.0", *ov],
                       SEG_DEFAULTS)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.rand(2, 1, 8, 8, 8, generator=g) for k in ("image", "image_weak", "image_strong")}
    batch["label"] = torch.randint(0, C, (2, 1, 8, 8, 8), generator=g).float()
    return batch


def _algo(name, cfg):
    return build_algo(name, cfg, C)


def _outputs(algo, batch):
    """Both networks' float64 logits on labeled + weak unlabeled crops, and the labels."""
    x = torch.cat([batch["image"], batch["image_weak"]])
    with torch.no_grad():
        return algo.student(x).double(), algo.student2(x).double(), batch["label"][:, 0].long()


@pytest.mark.parametrize("method", ["supervised", "fixmatch"])
def test_loss_name_ga_is_the_supervised_term(method):
    algo = _algo(method, _cfg("loss.name=ga"))
    batch = _batch(1)
    out = algo.train_step(batch, 0)
    _, logs = out.loss, out.logs
    with torch.no_grad():
        z = algo.student(batch["image"])
    want = ga_loss(z, batch["label"][:, 0].long(), k=10, gamma=0.5)
    assert logs["loss/sup"].item() == pytest.approx(want.item(), rel=1e-4)


def test_ga_step_wiring():
    algo = _algo("ga", _cfg("ga.lambda_u=0.5", "ga.rampup=0.0"))
    batch = _batch(2)
    out = algo.train_step(batch, 3)
    loss, logs = out.loss, out.logs
    za, zb, y = _outputs(algo, batch)

    def flat(z):
        return z.movedim(1, -1).reshape(-1, C)

    def sup(z):
        return gace_by_hand(flat(z), y.reshape(-1), 10, 0.5) + gadice_by_hand(flat(z), y.reshape(-1)).mean()
    # A learns from B's argmax and B from A's over the whole batch: GACE with k = 100
    cps = (gace_by_hand(flat(za), zb.argmax(1).reshape(-1), 100, 0.5)
           + gace_by_hand(flat(zb), za.argmax(1).reshape(-1), 100, 0.5))
    s = sup(za[:2]) + sup(zb[:2])
    assert logs["loss/sup"].item() == pytest.approx(s.item(), rel=1e-4)
    assert logs["loss/unsup"].item() == pytest.approx(cps.item(), rel=1e-4)
    assert loss.item() == pytest.approx((s + 0.5 * cps).item(), rel=1e-4)
    assert logs["unsup_weight"] == 0.5 and logs["mask_ratio"].item() == 1.0
    assert torch.allclose(logs["ga_dice"].double(), gadice_by_hand(flat(za[:2]), y.reshape(-1)), rtol=1e-4)
    for key in ("ga_ce", "ga_dice", "cps_ce", "topk_share", "pl_share"):
        assert logs[key].shape == (C,), key
    loss.backward()
    for net in (algo.student, algo.student2):
        assert all(p.grad is not None for p in net.parameters())
    assert set(algo.method_state()) == {"prior"}


def test_ga_options():
    batch = _batch(3)
    algo = _algo("ga", _cfg("train.steps=10"))        # the published 0.1, ramped over the whole run
    out = algo.train_step(batch, 4)
    _, logs = out.loss, out.logs
    assert logs["unsup_weight"] == pytest.approx(0.1 * math.exp(-5 * 0.6 ** 2))
    out = _algo("ga", _cfg("ga.threshold=0.99")).train_step(batch, 0)
    _, logs = out.loss, out.logs
    assert logs["mask_ratio"].item() < 1.0
    algo = _algo("ga", _cfg("ga.sup_loss=shared", "loss.name=batch_dice_ce", "ga.cps_dice=true"))
    out = algo.train_step(batch, 0)
    _, logs = out.loss, out.logs
    with torch.no_grad():
        za, zb = algo.student(batch["image"]), algo.student2(batch["image"])
    y = batch["label"][:, 0].long()
    want = supervised_loss(za, y, "batch_dice_ce") + supervised_loss(zb, y, "batch_dice_ce")
    assert logs["loss/sup"].item() == pytest.approx(want.item(), rel=1e-4) and "ga_dice" not in logs
    for ov, key in ((["ga.ties=random"], "ga.ties"), (["ga.sup_loss=x"], "ga.sup_loss"),
                    (["ga.k=0"], "ga.k"), (["ga.gamma=2"], "ga.gamma"),
                    (["ga.sup_loss=shared", "ga.k=5"], "ga.k")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _algo("ga", _cfg(*ov))


def test_ga_trains_two_steps_and_logs_per_class_curves(tmp_path):
    from train_helpers import CLASSES, make_tiny_prep, tiny_cfg

    from medseg_dpl.engine.trainer import train
    prep = make_tiny_prep(tmp_path / "prep")
    train(tiny_cfg(prep, "ga", "train.steps=2", "train.val_every=2", "train.checkpoint_every=2",
                   "eval.postprocess=false"), tmp_path / "run")
    ck = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert "student2" in ck and set(ck["method"]) == {"prior"}
    assert not all(torch.equal(ck["student"][k], ck["student2"][k]) for k in ck["student"])
    log = (tmp_path / "run/train.log").read_text(encoding="utf-8")
    assert "ga_dice=[" in log and "ga_ce=[" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "run/tb")).Reload().Tags()["scalars"]
    assert {f"ga_dice/{c}" for c in CLASSES} <= set(tags)
