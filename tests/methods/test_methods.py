"""Step math of the methods, checked against formulas written out independently in float64."""
import pytest
import torch
import torch.nn.functional as F

from medseg_dpl.config import load_config
from medseg_dpl.core.ema import ModelEMA
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.methods import METHODS, get_method
from medseg_dpl.methods.base import class_share, sigmoid_rampup
from medseg_dpl.models import build_model

C = 4


def _cfg(*ov):
    """The paper's form with plain masked CE and no CutMix unless an override says otherwise,
    so the formulas below stay short; the additions have their own tests."""
    return load_config(None, ["model.channels=[4,8]", "model.strides=[2]", "method.threshold=0.3",
                              "debias.momentum=0.8", "debias.variant=paper", "method.unsup_loss=ce",
                              "method.cutmix=0", *ov], SEG_DEFAULTS)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(2, 1, 8, 8, 8, generator=g),
            "label": torch.randint(0, C, (2, 1, 8, 8, 8), generator=g).float(),
            "image_weak": torch.rand(2, 1, 8, 8, 8, generator=g),
            "image_strong": torch.rand(2, 1, 8, 8, 8, generator=g)}


def _algo(name, cfg, prior=None, seed=0):
    torch.manual_seed(seed)
    net = build_model(cfg["model"], 1, C)
    algo = get_method(name)(net, cfg, C, prior)
    if algo.uses_teacher:
        # a teacher that differs from the student, so pseudo-labels are not trivially its own
        teacher = ModelEMA(net, momentum=0.5)
        with torch.no_grad():
            for p in teacher.module.parameters():
                p.add_(0.3 * torch.randn_like(p))
        algo.attach_teacher(teacher)
    return algo.train()


PRIOR = torch.tensor([0.7, 0.2, 0.08, 0.02])


def test_registry_and_unknown_method():
    assert set(METHODS) == {"supervised", "fixmatch", "debiaspl", "cps_depl", "dhc", "cld", "ga"}
    with pytest.raises(ValueError, match="unknown method 'mixmatch'"):
        get_method("mixmatch")


def test_sigmoid_rampup_and_class_share():
    assert sigmoid_rampup(0, 0) == 1.0
    assert sigmoid_rampup(0, 10) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0
    labels = torch.tensor([[0, 1, 1, 3]])
    mask = torch.tensor([[True, True, False, True]])
    assert class_share(labels, mask, 4).tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])


@pytest.mark.parametrize("reference", ["uniform", "labeled_prior"])
def test_debiaspl_tau0_equals_fixmatch(reference):
    cfg = _cfg("debias.tau=0.0", f"debias.reference={reference}", "method.cutmix=0.5",
               "method.unsup_loss=dice_ce")
    fm, dp = _algo("fixmatch", cfg, PRIOR), _algo("debiaspl", cfg, PRIOR)
    batch = _batch()
    torch.manual_seed(1)  # CutMix draws boxes from the global RNG (the trainer seeds it per step)
    out = fm.train_step(batch, 5)
    loss_f, logs_f = out.loss, out.logs
    torch.manual_seed(1)
    out = dp.train_step(batch, 5)
    loss_d, logs_d = out.loss, out.logs
    assert torch.equal(loss_f, loss_d)
    assert torch.equal(logs_f["pl_share"], logs_d["pl_share"])
    assert not torch.allclose(dp.qhat, torch.full((C,), 0.25))  # q̂ still tracks the response


@pytest.mark.parametrize("reference,include_bg", [("uniform", True), ("labeled_prior", True),
                                                  ("labeled_prior", False)])
def test_debiaspl_step_matches_formulas(reference, include_bg):
    tau, m, thr = 1.5, 0.8, 0.3
    cfg = _cfg(f"debias.tau={tau}", f"debias.reference={reference}",
               f"debias.include_background={str(include_bg).lower()}")
    algo = _algo("debiaspl", cfg, PRIOR)
    q0 = torch.tensor([0.5, 0.3, 0.15, 0.05])
    algo.response.qhat.copy_(q0)
    batch = _batch(1)
    out = algo.train_step(batch, 3)
    loss, logs = out.loss, out.logs

    with torch.no_grad():
        zw = algo.teacher(batch["image_weak"]).double()
        zs = algo.student(torch.cat([batch["image"], batch["image_strong"]]))[2:].double()
    pi = PRIOR.double() if reference == "labeled_prior" else torch.ones(C, dtype=torch.float64)

    def bias(q):
        b = torch.log(q.double()) - torch.log(pi)
        if not include_bg:
            b[0] = 0.0
        return b.view(1, C, 1, 1, 1)

    p = torch.softmax(zw - tau * bias(q0), 1)                          # counterfactual probs
    conf, lab = p.max(1)
    mask = conf >= thr
    q1 = m * q0.double() + (1 - m) * torch.softmax(zw, 1).mean(dim=(0, 2, 3, 4))   # q̂ EMA
    assert torch.allclose(algo.qhat.double(), q1, atol=1e-6)
    ce = F.cross_entropy(zs + tau * bias(q1), lab, reduction="none")  # margin loss on z + τ log q̂
    unsup = (ce * mask).mean()
    assert logs["loss/unsup"].item() == pytest.approx(unsup.item(), rel=1e-5, abs=1e-6)
    assert logs["mask_ratio"].item() == pytest.approx(mask.double().mean().item(), abs=1e-6)
    # and the margins matter: without them the loss differs
    assert (ce * mask).mean().item() != pytest.approx(
        (F.cross_entropy(zs, lab, reduction="none") * mask).mean().item(), rel=1e-3)


def test_debiaspl_masked_qhat_uses_confident_voxels_only():
    cfg = _cfg("debias.masked=true", "debias.reference=uniform", "method.threshold=0.5")
    algo = _algo("debiaspl", cfg)
    batch = _batch(2)
    with torch.no_grad():
        zw = algo.teacher(batch["image_weak"]).double()
    mask = torch.softmax(zw - torch.log(torch.tensor(0.25)), 1).max(1).values >= 0.5
    assert 0 < mask.sum() < mask.numel()
    p = torch.softmax(zw, 1).movedim(1, -1)[mask]
    expected = 0.8 * 0.25 + 0.2 * p.mean(0)
    algo.train_step(batch, 0)
    assert torch.allclose(algo.qhat.double(), expected, atol=1e-6)


def test_fixmatch_rampup_and_teacher_mode():
    cfg = _cfg("method.rampup=0.25", "train.steps=40", "method.lambda_u=2.0")   # 10 ramp steps
    algo = _algo("fixmatch", cfg)
    batch = _batch(3)
    out = algo.train_step(batch, 0)
    _, logs0 = out.loss, out.logs
    out = algo.train_step(batch, 10)
    _, logs10 = out.loss, out.logs
    assert logs0["unsup_weight"] == pytest.approx(2 * sigmoid_rampup(0, 10))
    assert logs10["unsup_weight"] == 2.0
    # teacher mode: confident external probabilities become the pseudo-labels
    lab = torch.randint(0, C, (2, 8, 8, 8))
    batch["teacher_probs"] = F.one_hot(lab, C).movedim(-1, 1).float() * 0.9 + 0.1 / C
    out = algo.train_step(batch, 10)
    _, logs = out.loss, out.logs
    assert logs["mask_ratio"].item() == 1.0
    assert torch.allclose(logs["pl_share"], class_share(lab, None, C))


def test_cps_depl_updates_both_networks_and_qhats():
    cfg = _cfg("debias.reference=labeled_prior")
    torch.manual_seed(0)
    a, b = build_model(cfg["model"], 1, C), build_model(cfg["model"], 1, C)
    algo = get_method("cps_depl")(a, cfg, C, PRIOR, student2=b).train()
    out = algo.train_step(_batch(4), 1)
    loss, logs = out.loss, out.logs
    loss.backward()
    assert torch.isfinite(loss)
    for net in (a, b):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert not torch.allclose(algo.response_a.qhat, algo.response_b.qhat)
    state = algo.method_state()
    assert set(state) == {"prior", "response_a.qhat", "response_b.qhat"}
    # q̂ starts at the reference (π with labeled_prior), not uniform
    fresh = get_method("cps_depl")(a, cfg, C, PRIOR, student2=b)
    torch.testing.assert_close(fresh.response_a.qhat, PRIOR)


def test_supervised_is_dice_plus_ce():
    cfg = _cfg()
    algo = _algo("supervised", cfg)
    batch = _batch(5)
    out = algo.train_step(batch, 0)
    loss, _ = out.loss, out.logs
    from monai.losses import DiceCELoss
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(algo.student(batch["image"]), batch["label"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_debiaspl_hard_response_averages_argmax_one_hot():
    cfg = _cfg("debias.response=hard", "debias.reference=uniform")
    algo = _algo("debiaspl", cfg)
    batch = _batch(4)
    with torch.no_grad():
        zw = algo.teacher(batch["image_weak"]).double()
    hard = F.one_hot(zw.argmax(1), C).double().reshape(-1, C).mean(0)
    expected = 0.8 * (1.0 / C) + 0.2 * hard
    algo.train_step(batch, 0)
    assert torch.allclose(algo.qhat.double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="debias.response"):
        _algo("debiaspl", _cfg("debias.response=argmax"))


def test_debiaspl_organ_prior_step_matches_formulas():
    """organ_prior: q̂ = EMA of the raw teacher argmax (starting at π); bias log(q̂/π) over the
    organ classes only, background 0, clipped; margins on the student's logits."""
    tau, m, thr, bmax = 1.0, 0.8, 0.3, 0.5
    cfg = _cfg("debias.variant=organ_prior", f"debias.tau={tau}", f"debias.b_max={bmax}")
    algo = _algo("debiaspl", cfg, PRIOR)
    torch.testing.assert_close(algo.qhat, PRIOR)          # starts at the reference
    assert torch.allclose(algo.bias(), torch.zeros(C), atol=1e-6)  # no bias before any evidence
    batch = _batch(6)
    out = algo.train_step(batch, 2)
    loss, logs = out.loss, out.logs
    with torch.no_grad():
        zw = algo.teacher(batch["image_weak"]).double()
        zs = algo.student(torch.cat([batch["image"], batch["image_strong"]]))[2:].double()

    def bias(q):
        qo, po = q[1:].double() / q[1:].double().sum(), PRIOR[1:].double() / PRIOR[1:].double().sum()
        return torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.log(qo / po).clamp(-bmax, bmax)]).view(1, C, 1, 1, 1)

    p = torch.softmax(zw, 1)                                # b = 0 at the first step
    conf, lab = p.max(1)
    mask = conf >= thr
    hard = F.one_hot(zw.argmax(1), C).double().reshape(-1, C).mean(0)
    q1 = m * PRIOR.double() + (1 - m) * hard
    assert torch.allclose(algo.qhat.double(), q1, atol=1e-6)
    ce = F.cross_entropy(zs + tau * bias(q1), lab, reduction="none")
    assert logs["loss/unsup"].item() == pytest.approx((ce * mask).mean().item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(logs["bias"].double(), bias(q1).flatten(), atol=1e-6)


@pytest.mark.parametrize("method", ["fixmatch", "debiaspl"])
@pytest.mark.parametrize("background", ["fixed", "adaptive"])
def test_class_thresholds_once_per_step_background_fixed(method, background):
    from medseg_dpl.core.debias import classwise_thresholds
    cfg = _cfg("debias.variant=organ_prior", "method.class_thresholds=true", "method.threshold_floor=0.2",
               "method.threshold=0.6", f"method.background_threshold={background}")
    algo = _algo(method, cfg, PRIOR)
    rate0 = algo.confident.qhat.clone()
    out = algo.train_step(_batch(7), 0)
    _, logs = out.loss, out.logs
    thr = logs["thresholds"]
    want = classwise_thresholds(rate0, PRIOR, 0.6, 0.2)    # from the statistics before the step
    if background == "fixed":
        want[0] = 0.6
    assert torch.allclose(thr, want)
    assert not torch.equal(algo.confident.qhat, rate0)     # updated once, after the mask
    state = {"prior", "confident.qhat"} | ({"response.qhat"} if method == "debiaspl" else set())
    assert set(algo.method_state()) == state


def test_cutmix_boxes_and_dice_ce_unsup_loss():
    from monai.losses import MaskedDiceLoss

    from medseg_dpl.methods.fixmatch import cutmix_boxes
    torch.manual_seed(0)
    assert not cutmix_boxes(3, (8, 8, 8), 0.0, "cpu").any()
    boxes = cutmix_boxes(4, (16, 16, 16), 1.0, "cpu")
    share = boxes.float().mean(dim=(1, 2, 3))
    assert ((share > 0.03) & (share < 0.7)).all()           # 0.1-0.5 of the crop, up to rounding
    for b in boxes:                                        # each a single axis-aligned box
        idx = b.nonzero()
        assert b.sum() == (idx.max(0).values - idx.min(0).values + 1).prod()
    cfg = _cfg("method.unsup_loss=dice_ce")
    algo = _algo("fixmatch", cfg)
    logits = torch.randn(2, C, 6, 6, 6)
    labels = torch.randint(0, C, (2, 6, 6, 6))
    mask = torch.rand(2, 6, 6, 6) > 0.5
    expected = ((F.cross_entropy(logits, labels, reduction="none") * mask).mean()
                + MaskedDiceLoss(to_onehot_y=True, softmax=True)(logits, labels[:, None].float(),
                                                                  mask[:, None].float()))
    assert algo.unsup_loss(logits, labels, mask).item() == pytest.approx(expected.item(), rel=1e-6)
