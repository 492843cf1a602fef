"""DHC and CLD: class-weight formulas against hand-computed values, and their steps' wiring."""
import math

import pytest
import torch
import torch.nn.functional as F

from medseg_dpl.config import load_config
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.methods import get_method
from medseg_dpl.methods.cld import cld_weights, keep_rates
from medseg_dpl.methods.dhc import distdw_weights
from medseg_dpl.methods.losses import weighted_ce, weighted_dice_loss
from medseg_dpl.models import build_model

C = 4
PRIOR = torch.tensor([0.7, 0.2, 0.08, 0.02])


def _cfg(*ov):
    return load_config(None, ["model.channels=[4,8]", "model.strides=[2]", *ov], SEG_DEFAULTS)


def _algo(name, cfg, prior=PRIOR):
    torch.manual_seed(0)
    a, b = build_model(cfg["model"], 1, C), build_model(cfg["model"], 1, C)
    return get_method(name)(a, cfg, C, prior, student2=b).train()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(2, 1, 8, 8, 8, generator=g),
            "label": torch.randint(0, C, (2, 1, 8, 8, 8), generator=g).float(),
            "image_weak": torch.rand(2, 1, 8, 8, 8, generator=g)}


def _logits(labels):
    """``(N, *)`` labels -> logits whose argmax they are."""
    return 5.0 * F.one_hot(torch.as_tensor(labels), C).movedim(-1, 1).float()


# ------------------------------------------------------------------------------ DHC: DistDW
def test_distdw_formula_by_hand():
    # counts 1000:100:10:1 -> log ratios 0, ln10, 2 ln10, 3 ln10 -> C·(0, 1/3, 2/3, 1)
    w = distdw_weights(torch.tensor([1000.0, 100.0, 10.0, 1.0]))
    assert w.tolist() == pytest.approx([0.0, 4 / 3, 8 / 3, 4.0], abs=1e-6)
    # scale-free: frequencies give the same weights
    assert torch.allclose(distdw_weights(torch.tensor([0.9, 0.09, 0.009, 0.0009])), w, atol=1e-5)


def test_distdw_starts_from_labeled_counts_and_moves_by_ema():
    algo = _algo("dhc", _cfg("dhc.background_min=0.5"))
    # π = 0.7, 0.2, 0.08, 0.02 -> ln(0.7/π_c) = 0, ln 3.5, ln 8.75, ln 35
    w0 = [4 * math.log(x) / math.log(35) for x in (1.0, 3.5, 8.75, 35.0)]
    assert algo.weight_b.tolist() == pytest.approx(w0, abs=1e-5)
    labels = torch.tensor([0] * 1000 + [1] * 100 + [2] * 10 + [3])[None]   # B's argmax counts
    w = algo.update_distdw(_logits(labels))
    expected = [0.99 * a + 0.01 * b for a, b in zip(w0, [0.0, 4 / 3, 8 / 3, 4.0])]
    assert algo.weight_b.tolist() == pytest.approx(expected, abs=1e-5)
    assert w.tolist() == pytest.approx([0.5] + expected[1:], abs=1e-5)   # floor on the loss only
    assert algo.weight_b[0] == 0.0                                         # background as published


# ------------------------------------------------------------------------------ DHC: DiffDW
def _dice(tp, fp, fn):
    return (2 * tp + 1e-8) / (2 * tp + fp + fn + 2e-8)


def test_diffdw_two_steps_by_hand():
    algo = _algo("dhc", _cfg("dhc.diff_window=2", "dhc.diff_power=0.5"))   # EMA momentum 1/2
    target = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 3, 3]])
    pred1 = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 3, 3, 3]])
    pred2 = torch.tensor([[0, 0, 0, 0, 1, 2, 2, 2, 3, 3]])
    # per class (tp, fp, fn), counted by hand
    d1 = [_dice(3, 0, 1), _dice(2, 1, 0), _dice(1, 0, 1), _dice(2, 1, 0)]   # 6/7, 4/5, 2/3, 4/5
    d2 = [_dice(4, 0, 0), _dice(1, 0, 1), _dice(2, 1, 0), _dice(2, 0, 0)]   # 1, 2/3, 4/5, 1
    learn, unlearn, undice, last = [0.0] * C, [0.0] * C, [1.0] * C, [1e-8] * C
    for pred, dice in ((pred1, d1), (pred2, d2)):
        w = algo.update_diffdw(_logits(pred), target)
        raw = []
        for c in range(C):
            delta, r = dice[c] - last[c], math.log(dice[c] / last[c])
            learn[c] = 0.5 * learn[c] + 0.5 * (max(delta, 0.0) * r)
            unlearn[c] = 0.5 * unlearn[c] + 0.5 * (min(delta, 0.0) * r)
            undice[c] = 0.5 * undice[c] + 0.5 * (1 - dice[c])
            last[c] = dice[c]
            raw.append(((unlearn[c] + 1e-8) / (learn[c] + 1e-8)) ** 0.5 * undice[c])
        expected = [C * x / max(raw) for x in raw]
        assert w.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # class 1 unlearned at step 2 (4/5 -> 2/3): it is now the hardest class, weight C
    assert int(w.argmax()) == 1 and algo.unlearn[1] > 0 and algo.unlearn[0] == 0


@pytest.mark.parametrize("skip", [True, False])
def test_diffdw_absent_class(skip):
    algo = _algo("dhc", _cfg(f"dhc.skip_absent={str(skip).lower()}"))
    target = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    algo.update_diffdw(_logits(target), target)            # every class perfect: Dice 1
    before = (algo.last_dice.clone(), algo.learn.clone(), algo.undice.clone())
    target2 = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2]])     # class 3 in neither label nor prediction
    algo.update_diffdw(_logits(target2), target2)
    if skip:
        assert algo.last_dice[3] == before[0][3] and algo.learn[3] == before[1][3]
        assert algo.undice[3] == before[2][3] and algo.unlearn[3] == 0
    else:   # the published code: smoothed Dice 0/0 = 0.5, read as unlearning
        assert algo.last_dice[3].item() == pytest.approx(0.5, abs=1e-6)
        assert algo.unlearn[3] > 0


# ------------------------------------------------------------------------------ DHC: the step
def test_dhc_step_weights_each_network_by_its_own_scheme():
    algo = _algo("dhc", _cfg("dhc.lambda_u=0.5", "dhc.rampup=0.0", "dhc.sup_loss=published"))
    batch = _batch(1)
    out = algo.train_step(batch, 0)
    loss, logs = out.loss, out.logs
    x = torch.cat([batch["image"], batch["image_weak"]])
    y = batch["label"][:, 0].long()
    with torch.no_grad():
        za, zb = algo.student(x).double(), algo.student2(x).double()
    wa, wb = logs["weight_a"].double(), logs["weight_b"].double()
    assert torch.equal(logs["weight_a"], algo.weight_a)     # DiffDW for A, DistDW for B
    assert torch.allclose(logs["weight_b"], algo.weight_b)

    def wce(z, t, w):   # PyTorch's weighted mean, written out
        ce = -torch.log_softmax(z, 1).gather(1, t[:, None])[:, 0]
        return (w[t] * ce).sum() / w[t].sum()

    def wdice(z, t, w):
        p, oh = torch.softmax(z, 1), F.one_hot(t, C).movedim(-1, 1).double()
        dims = (0, 2, 3, 4)
        tp, fp, fn = (p * oh).sum(dims), (p * (1 - oh)).sum(dims), ((1 - p) * oh).sum(dims)
        d = (2 * tp + 1) / (2 * tp + fp + fn + 1)
        return (w[1:] * (1 - d[1:])).mean()

    sup = wce(za[:2], y, wa) + wdice(za[:2], y, wa) + wce(zb[:2], y, wb) + wdice(zb[:2], y, wb)
    cps = wce(za, zb.argmax(1), wa) + wce(zb, za.argmax(1), wb)           # whole batch, no threshold
    assert logs["loss/sup"].item() == pytest.approx(sup.item(), rel=1e-4)
    assert logs["loss/unsup"].item() == pytest.approx(cps.item(), rel=1e-4)
    assert loss.item() == pytest.approx((sup + 0.5 * cps).item(), rel=1e-4)
    loss.backward()
    for net in (algo.student, algo.student2):
        assert all(p.grad is not None for p in net.parameters())
    assert set(algo.method_state()) == {"prior", "weight_a", "weight_b", "last_dice", "learn",
                                        "unlearn", "undice"}


@pytest.mark.parametrize("method", ["dhc", "cld"])
def test_shared_supervised_loss_carries_the_methods_weights(method):
    """Default ``sup_loss=shared``: the method's class weights on the shared loss (loss.name)."""
    from medseg_dpl.methods.losses import supervised_loss
    algo = _algo(method, _cfg("loss.name=batch_dice_ce"))
    batch = _batch(3)
    out = algo.train_step(batch, 0)
    _, logs = out.loss, out.logs
    x, y = batch["image"], batch["label"][:, 0].long()
    with torch.no_grad():
        za, zb = algo.student(x), algo.student2(x)
    wa, wb = ((logs["weight_a"], logs["weight_b"]) if method == "dhc"
              else (algo.class_weight, algo.class_weight))
    sup = supervised_loss(za, y, "batch_dice_ce", wa) + supervised_loss(zb, y, "batch_dice_ce", wb)
    assert logs["loss/sup"].item() == pytest.approx(sup.item(), rel=1e-4)
    with pytest.raises(ValueError, match=f"{method}.sup_loss"):
        _algo(method, _cfg(f"{method}.sup_loss=other")).train_step(batch, 0)


def test_dhc_threshold_masks_cross_pseudo_labels():
    algo = _algo("dhc", _cfg("dhc.threshold=0.99"))
    out = algo.train_step(_batch(2), 0)
    _, logs = out.loss, out.logs
    assert logs["mask_ratio"].item() < 1.0


def test_weighted_losses_reduce_to_plain_ones_with_unit_weights():
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(2, C, 5, 5, generator=g), torch.randint(0, C, (2, 5, 5), generator=g)
    ones = torch.ones(C)
    assert weighted_ce(z, t, ones).item() == pytest.approx(F.cross_entropy(z, t).item(), rel=1e-6)
    assert weighted_ce(z, t, ones, normalize="voxels").item() == pytest.approx(F.cross_entropy(z, t).item(), rel=1e-6)
    w = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert weighted_ce(z, t, w).item() == pytest.approx(F.cross_entropy(z, t, weight=w).item(), rel=1e-6)
    assert weighted_dice_loss(z, t, torch.zeros(C)).item() == 0.0


# ------------------------------------------------------------------------------ CLD
def test_cld_weights_and_keep_rates_by_hand():
    w = cld_weights(PRIOR, 1 / 3)
    assert w.tolist() == pytest.approx([1.0, 3.5 ** (1 / 3), 8.75 ** (1 / 3), 35 ** (1 / 3)], rel=1e-5)
    # 1 - conf = .1 .4 .5 .2 -> / .5 -> .2 .8 1 .4 -> sqrt
    r = keep_rates(torch.tensor([0.9, 0.6, 0.5, 0.8]), 0.5)
    assert r.tolist() == pytest.approx([0.2 ** 0.5, 0.8 ** 0.5, 1.0, 0.4 ** 0.5], rel=1e-5)


def test_cld_confidence_bank_window_then_ema():
    algo = _algo("cld", _cfg("cld.conf_every=2", "cld.conf_momentum=0.5"))
    target = torch.tensor([[0, 0, 1, 1, 2, 2]])                 # class 3 absent
    probs = torch.full((1, C, 6), 0.1)
    probs[0, :, :] = torch.tensor([[.7, .5, .1, .1, .1, .1], [.1, .3, .6, .8, .1, .1],
                                   [.1, .1, .2, .05, .4, .6], [.1, .1, .1, .05, .4, .2]])
    logits = torch.log(probs)
    p_true = [(.7 + .5) / 2, (.6 + .8) / 2, (.4 + .6) / 2]      # mean prob of the true class
    algo.record_confidence([logits, logits], target)
    assert algo.conf.sum() == 0                                  # window not full yet
    algo.record_confidence([logits, logits], target)
    assert algo.conf[0, :3].tolist() == pytest.approx(p_true, rel=1e-5)
    assert algo.conf[0, 3] == 0 and algo.conf_seen[0].tolist() == [1, 1, 1, 0]
    half = torch.log(torch.full((1, C, 6), 0.25))                # next window: all probs 1/4
    algo.record_confidence([half, half], target)
    algo.record_confidence([half, half], target)
    assert algo.conf[1, :3].tolist() == pytest.approx([0.5 * p + 0.125 for p in p_true], rel=1e-5)
    assert algo.conf[1, 3] == 0                                  # absent class: unchanged


def test_cld_code_bank_random_start_and_absent_class_as_zero():
    algo = _algo("cld", _cfg("cld.conf_every=1", "cld.conf_momentum=0.5", "cld.code_bank=true"))
    start = algo.conf.clone()
    assert torch.equal(start[0], start[1]) and (start > 0).all() and (start < 1).all()
    target = torch.tensor([[0, 0, 1, 1, 2, 2]])
    algo.record_confidence([torch.zeros(1, C, 6)] * 2, target)   # first window replaces: 1/4, class 3 -> 0
    assert algo.conf[0].tolist() == pytest.approx([0.25, 0.25, 0.25, 0.0])
    algo.record_confidence([torch.zeros(1, C, 6)] * 2, target)
    assert algo.conf[0, 3] == 0.0 and algo.conf[0, 0].item() == pytest.approx(0.25)


@pytest.mark.parametrize("mask_by", ["pseudo_label", "prediction"])
def test_cld_step_keeps_voxels_by_class_rate(mask_by):
    algo = _algo("cld", _cfg(f"cld.mask_by={mask_by}", "cld.gamma=1.0"))
    algo.conf.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))  # A: never class 0
    batch = _batch(4)
    torch.manual_seed(7)
    out = algo.train_step(batch, 0)
    loss, logs = out.loss, out.logs
    assert logs["keep_rate_a"].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])
    x = torch.cat([batch["image"], batch["image_weak"]])
    with torch.no_grad():
        za, zb = algo.student(x).double(), algo.student2(x).double()
    la, lb = za.argmax(1), zb.argmax(1)
    w = algo.class_weight.double()
    torch.manual_seed(7)
    keep_a = torch.rand(la.shape) < logs["keep_rate_a"][lb if mask_by == "pseudo_label" else la]
    keep_b = torch.rand(lb.shape) < logs["keep_rate_b"][la if mask_by == "pseudo_label" else lb]

    def ce(z, t, m):
        return (w[t] * m * -torch.log_softmax(z, 1).gather(1, t[:, None])[:, 0]).mean()
    cps = ce(za, lb, keep_a) + ce(zb, la, keep_b)
    assert logs["loss/unsup"].item() == pytest.approx(cps.item(), rel=1e-4)
    dropped = (lb if mask_by == "pseudo_label" else la) == 0
    assert dropped.any() and not keep_a[dropped].any()
    assert set(algo.method_state()) == {"prior", "class_weight", "conf", "conf_seen", "window",
                                        "window_steps"}
    with pytest.raises(ValueError, match="cld.mask_by"):
        _algo("cld", _cfg("cld.mask_by=own"))


# ------------------------------------------------------------------------------ in the trainer
@pytest.mark.parametrize("method,vector", [("dhc", "weight_b"), ("cld", "keep_rate_a")])
def test_trains_with_two_networks_and_logs_per_class_curves(tmp_path, method, vector):
    from train_helpers import CLASSES, make_tiny_prep, tiny_cfg

    from medseg_dpl.engine.trainer import train
    prep = make_tiny_prep(tmp_path / "prep")
    train(tiny_cfg(prep, method, "train.steps=2", "train.val_every=2", "train.checkpoint_every=2",
                   "eval.postprocess=false"), tmp_path / "run")
    ck = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert "student2" in ck and ck["model"].keys() == ck["student"].keys()
    # inference: the EMA of A, as for every method
    assert all(torch.equal(ck["model"][k], ck["teacher"][k]) for k in ck["model"])
    assert not all(torch.equal(ck["model"][k], ck["student"][k]) for k in ck["model"])
    assert not all(torch.equal(ck["student"][k], ck["student2"][k]) for k in ck["student"])
    log = (tmp_path / "run/train.log").read_text(encoding="utf-8")
    assert f"{vector}=[" in log   # the trainer writes one TensorBoard curve per class for (C,) logs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "run/tb")).Reload().Tags()["scalars"]
    assert {f"{vector}/{c}" for c in CLASSES} <= set(tags)
