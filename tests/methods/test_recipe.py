"""The shared recipe: one supervised loss (float64 against its formulas), one evaluation rule,
inert config keys refused, the benchmark's parallel runner."""
import pytest
import torch
import torch.nn.functional as F

from medseg_dpl.config import ConfigError, load_config
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.methods import METHODS, get_method
from medseg_dpl.methods.losses import DICE_CE_LOSSES, SUP_LOSSES, supervised_loss
from medseg_dpl.models import build_model

C = 4


def _dice_by_hand(p, oh, dims, organs_only, w=None, smooth=1e-5):
    tp, sp, sy = (p * oh).sum(dims), p.sum(dims), oh.sum(dims)
    loss = 1 - (2 * tp + smooth) / (sp + sy + smooth)      # (C,) or (N, C)
    if w is not None:
        loss = loss * w
    return (loss[..., 1:] if organs_only else loss).mean()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", DICE_CE_LOSSES)   # ga: tests/test_ga.py
def test_supervised_loss_float64_against_its_formula(name, weighted):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, C, 5, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (2, 5, 4, 3), generator=g)
    y[1][y[1] == 3] = 0                      # class 3 absent from the second crop
    w = torch.tensor([0.1, 1.0, 2.0, 4.0], dtype=torch.float64) if weighted else None
    p, oh = torch.softmax(z, 1), F.one_hot(y, C).movedim(-1, 1).double()
    ce = -torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0]
    ce = (w[y] * ce).sum() / w[y].sum() if weighted else ce.mean()
    form = SUP_LOSSES[name]
    dims = (0, 2, 3, 4) if form["batch"] else (2, 3, 4)
    dice = _dice_by_hand(p, oh, dims, not form["include_background"], w)
    got = supervised_loss(z, y, name, w)
    # the loss runs in float32 (as in training): agreement to float32 precision
    assert got.item() == pytest.approx((dice + ce).item(), rel=1e-5)


def test_dice_ce_is_monai_dicece_and_unknown_names_fail():
    from monai.losses import DiceCELoss
    z, y = torch.randn(2, C, 6, 6, 4), torch.randint(0, C, (2, 6, 6, 4))
    assert supervised_loss(z, y, "dice_ce").item() == DiceCELoss(to_onehot_y=True, softmax=True)(
        z, y[:, None].float()).item()
    with pytest.raises(ValueError, match="loss.name"):
        supervised_loss(z, y, "focal")


def _cfg(*ov):
    return load_config(None, ["model.channels=[4,8]", "model.strides=[2]", *ov], SEG_DEFAULTS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_its_labeled_crops_with_the_shared_loss(method):
    """With the method's own idea switched off (no unlabeled weight, unit class weights where
    the method has them, none for DHC), the supervised term is ``loss.name`` itself."""
    cfg = _cfg("loss.name=batch_dice_ce", "method.lambda_u=0.0", "method.cutmix=0.0")
    from train_helpers import build_algo
    cls, algo = get_method(method), build_algo(method, cfg, C)
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.rand(2, 1, 8, 8, 8, generator=g) for k in ("image", "image_weak", "image_strong")}
    batch["label"] = torch.randint(0, C, (2, 1, 8, 8, 8), generator=g).float()
    out = algo.train_step(batch, 0)
    _, logs = out.loss, out.logs
    if cls.num_networks == 2:
        return  # their weights differ from 1 by design; tests/test_imbalance_methods.py checks them
    with torch.no_grad():
        z = algo.student(batch["image"])
    want = supervised_loss(z, batch["label"][:, 0].long(), "batch_dice_ce")
    assert logs["loss/sup"].item() == pytest.approx(want.item(), rel=1e-4)


def test_two_network_methods_are_evaluated_by_the_ema_of_a():
    for name in ("dhc", "cld", "cps_depl"):
        assert get_method(name).uses_teacher, name     # the trainer keeps an EMA of A


@pytest.mark.parametrize("ov,key", [
    (["debias.variant=organ_prior", "debias.reference=uniform"], "debias.reference"),
    (["debias.variant=organ_prior", "debias.include_background=false"], "debias.include_background"),
    (["debias.variant=organ_prior", "debias.response=hard"], "debias.response"),
    (["debias.variant=paper", "debias.b_max=3.0"], "debias.b_max"),
    (["method.threshold_floor=0.3"], "method.threshold_floor"),
    (["method.background_threshold=adaptive"], "method.background_threshold"),
])
@pytest.mark.parametrize("method", ["debiaspl", "cps_depl", "fixmatch"])
def test_a_key_the_chosen_variant_ignores_is_an_error_naming_it(method, ov, key):
    cls = get_method(method)
    cfg = _cfg(*ov)
    nets = [build_model(cfg["model"], 1, C) for _ in range(cls.num_networks)]
    extra = {"student2": nets[1]} if len(nets) == 2 else {}
    if method == "fixmatch" and key.startswith("debias."):
        cls(nets[0], cfg, C, **extra)       # not FixMatch's own section: no error
        return
    if method == "cps_depl" and key.startswith("method."):
        return                              # cps_depl has no per-class thresholds
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cls(nets[0], cfg, C, **extra)
    cls(nets[0], _cfg(), C, **extra)   # the defaults themselves are fine


def test_shipped_configs_have_no_inert_keys():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("phantom.yaml", "chaos_mr.yaml"):
        for method in ("debiaspl", "cps_depl"):
            cfg = load_config(root / name, [f"method.name={method}", "model.channels=[4,8]",
                                            "model.strides=[2]"], SEG_DEFAULTS)
            from medseg_dpl.methods.checks import check_ignored_keys
            check_ignored_keys(cfg, ("debias", "method"))


@pytest.mark.parametrize("kind", ["cld", "distdw"])
def test_supervised_controls_carry_a_peers_class_weights(kind):
    """``loss.class_weight``: the peer's weights from π on the single-network loss."""
    from medseg_dpl.methods.cld import cld_weights
    from medseg_dpl.methods.dhc import distdw_weights
    prior = torch.tensor([0.7, 0.2, 0.08, 0.02])
    cfg = _cfg(f"loss.class_weight={kind}", "loss.name=batch_dice_ce", "dhc.background_min=0.5")
    algo = get_method("supervised")(build_model(cfg["model"], 1, C), cfg, C, prior)
    want = cld_weights(prior, cfg["cld"]["power"]) if kind == "cld" else distdw_weights(prior)
    if kind == "distdw":
        assert want[0] == 0 and algo.sup_class_weight[0] == 0.5     # the floor applies
        want[0] = 0.5
    assert torch.allclose(algo.sup_class_weight, want)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 1, 8, 8, 8, generator=g), torch.randint(0, C, (2, 1, 8, 8, 8), generator=g)
    out = algo.train_step({"image": x, "label": y.float()}, 0)
    _, logs = out.loss, out.logs
    with torch.no_grad():
        ref = supervised_loss(algo.student(x), y[:, 0], "batch_dice_ce", want)
    assert logs["loss/sup"].item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="loss.class_weight"):
        get_method("supervised")(build_model(cfg["model"], 1, C), _cfg("loss.class_weight=focal"), C, prior)


def test_logit_adjustment_moves_the_ce_only():
    """``loss.logit_adjust`` τ_l: CE(z + τ_l·log π, y) + Dice on softmax(z)."""
    from monai.losses import DiceLoss
    prior = torch.tensor([0.7, 0.2, 0.08, 0.02])
    cfg = _cfg("loss.logit_adjust=1.0", "loss.name=organ_dice_ce")
    algo = get_method("supervised")(build_model(cfg["model"], 1, C), cfg, C, prior)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 1, 8, 8, 8, generator=g), torch.randint(0, C, (2, 1, 8, 8, 8), generator=g)
    out = algo.train_step({"image": x, "label": y.float()}, 0)
    _, logs = out.loss, out.logs
    with torch.no_grad():
        z = algo.student(x).double()
    adj = z + torch.log(prior.double()).reshape(1, C, 1, 1, 1)
    want = (DiceLoss(to_onehot_y=True, softmax=True, include_background=False)(z, y.double())
            + F.cross_entropy(adj, y[:, 0]))
    assert logs["loss/sup"].item() == pytest.approx(want.item(), rel=1e-5)
