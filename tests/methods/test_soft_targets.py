"""#18 item 4: soft counterfactual targets below the threshold (``method.soft_weight``)."""
import pytest
import torch

from medseg_dpl.config import load_config
from medseg_dpl.core.debias import pseudo_labels, soft_cross_entropy
from medseg_dpl.core.ema import ModelEMA
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.methods import get_method
from medseg_dpl.models import build_model

C = 3


@pytest.mark.parametrize("shape", [(5, C), (2, C, 3, 4, 2)])
def test_soft_cross_entropy_matches_float64_formula(shape):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g)
    p = torch.softmax(torch.randn(shape, generator=g), 1)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) > 0.4
    z64, p64 = z.double(), p.double()
    per_pos = -(p64 * torch.log_softmax(z64, 1)).sum(1)
    want = (per_pos * mask.double()).sum() / mask.numel()     # over all positions, as FixMatch's CE
    assert soft_cross_entropy(z, p, mask).item() == pytest.approx(want.item(), rel=1e-6)
    assert soft_cross_entropy(z, p).item() == pytest.approx(per_pos.mean().item(), rel=1e-6)
    assert soft_cross_entropy(z, p, torch.zeros_like(mask)).item() == 0.0


def test_soft_targets_push_a_class_up_where_the_target_exceeds_the_student():
    z = torch.zeros(1, C, 4, requires_grad=True)            # student: uniform
    p = torch.tensor([0.2, 0.2, 0.6])[None, :, None].expand(1, C, 4)   # the target favours class 2
    soft_cross_entropy(z, p).backward()
    assert (z.grad[0, 2] < 0).all() and (z.grad[0, :2] > 0).all()   # descent raises class 2


def _cfg(*ov):
    return load_config(None, ["model.channels=[4,8]", "model.strides=[2]", "method.threshold=0.4",
                              "method.cutmix=0", "debias.momentum=0.8", *ov], SEG_DEFAULTS)


def _algo(name, cfg):
    torch.manual_seed(0)
    net = build_model(cfg["model"], 1, C)
    algo = get_method(name)(net, cfg, C, torch.tensor([0.7, 0.2, 0.1]))
    teacher = ModelEMA(net, momentum=0.5)
    for p in teacher.module.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    algo.attach_teacher(teacher)
    return algo.train()


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(2, 1, 8, 8, 8, generator=g),
            "label": torch.randint(0, C, (2, 1, 8, 8, 8), generator=g).float(),
            "image_weak": torch.rand(2, 1, 8, 8, 8, generator=g),
            "image_strong": torch.rand(2, 1, 8, 8, 8, generator=g)}


@pytest.mark.parametrize("method", ["fixmatch", "debiaspl"])
def test_soft_weight_adds_the_soft_term_on_unconfident_voxels(method):
    batch = _batch()
    base = _algo(method, _cfg()).train_step(batch, 10)
    algo = _algo(method, _cfg("method.soft_weight=0.25"))
    out = algo.train_step(batch, 10)
    # the hard terms are unchanged; the unsupervised loss grows by exactly 0.25 × the soft CE
    assert out.scalars["loss/sup"] == base.scalars["loss/sup"]
    soft = out.scalars["loss/soft"]
    assert out.scalars["loss/unsup"].item() == pytest.approx(base.scalars["loss/unsup"].item() + 0.25 * soft.item(),
                                                             rel=1e-5)
    # by hand: the teacher's (debiased) probabilities where no hard label is kept
    fresh = _algo(method, _cfg("method.soft_weight=0.25"))
    with torch.no_grad():
        probs, _ = fresh.teacher_probs(fresh.weak_logits(batch), fresh.thresholds())
        _, mask = pseudo_labels(probs, fresh.thresholds())
        z = fresh.student(torch.cat([batch["image"], batch["image_strong"]]))[2:]
        want = soft_cross_entropy(fresh.unsup_logits(z), probs, ~mask)
    assert 0 < (~mask).float().mean() < 1
    assert soft.item() == pytest.approx(want.item(), rel=1e-5)
