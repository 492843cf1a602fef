"""engine/reports.py: crop-level pseudo-label statistics, validation Dice and the final
pseudo-label report, on hand-made label maps (an "oracle" network whose output is a known
function of the image) and on a tiny prep with real methods (``build_algo``)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from train_helpers import CLASSES, build_algo, make_tiny_prep, tiny_cfg

from medseg_dpl.engine.reports import CropPseudoLabelStats, pseudo_label_report, validate

C = 4


# --- CropPseudoLabelStats ------------------------------------------------------------------

# 12 voxels as (U=2, 3, 2, 1) crops; by hand (confident voxels 0,1,2,3,5,6,7,8,11):
#   confident pseudo-labels per class  pl   = [3, 3, 2, 1]
#   confident and right                tp   = [2, 2, 1, 1]
#   truth over all voxels              true = [3, 4, 3, 2]
LABELS = [0, 1, 1, 2, 2, 2, 3, 0, 1, 1, 3, 0]
MASK = [1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1]
TRUTH = [0, 1, 2, 2, 2, 1, 3, 1, 1, 0, 3, 0]


def _crops(values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype).reshape(2, 3, 2, 1)


def test_crop_stats_by_hand():
    s = CropPseudoLabelStats(C)
    s.add(_crops(LABELS), _crops(MASK, torch.bool), _crops(TRUTH))
    out = s.summary()
    assert set(out) == {"pl_share", "true_share", "precision", "recall"}
    assert out["pl_share"] == pytest.approx([3 / 6, 2 / 6, 1 / 6])           # organs only
    assert out["true_share"] == pytest.approx([4 / 9, 3 / 9, 2 / 9])
    assert out["precision"] == pytest.approx([2 / 3, 2 / 3, 1 / 2, 1 / 1])    # tp / pl, per class
    assert out["recall"] == pytest.approx([2 / 3, 2 / 4, 1 / 3, 1 / 2])       # tp / true


def test_crop_stats_accumulate_over_adds_take_channel_truth_and_reset_on_summary():
    s = CropPseudoLabelStats(C)
    # the trainer's truth is (U, 1, *patch): reshaped to the labels' shape
    s.add(_crops(LABELS), _crops(MASK, torch.bool), _crops(TRUTH)[:, None])
    s.add(_crops(LABELS), _crops(MASK, torch.bool), _crops(TRUTH)[:, None])
    out = s.summary()
    assert out["pl_share"] == pytest.approx([3 / 6, 2 / 6, 1 / 6])  # doubled counts, same shares
    assert out["precision"] == pytest.approx([2 / 3, 2 / 3, 1 / 2, 1.0])
    assert out["recall"] == pytest.approx([2 / 3, 2 / 4, 1 / 3, 1 / 2])
    # summary() resets: nothing accumulated, no truth seen
    empty = s.summary()
    assert empty == {"pl_share": [0.0, 0.0, 0.0]}


def test_crop_stats_without_truth_and_nan_where_undefined():
    s = CropPseudoLabelStats(C)
    s.add(_crops(LABELS), _crops(MASK, torch.bool), None)
    out = s.summary()
    assert set(out) == {"pl_share"}
    assert out["pl_share"] == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    # class 3 neither pseudo-labelled nor present: precision and recall NaN, not 0 or an error
    lab = torch.tensor([[0, 1, 2, 2]])
    s.add(lab, torch.tensor([[True, True, True, False]]), torch.tensor([[0, 1, 1, 2]]))
    out = s.summary()
    assert out["pl_share"] == pytest.approx([1 / 2, 1 / 2, 0.0])
    assert out["precision"][:3] == pytest.approx([1.0, 1.0, 0.0])
    assert out["recall"][:3] == pytest.approx([1.0, 1 / 2, 0.0])
    assert math.isnan(out["precision"][3]) and math.isnan(out["recall"][3])


# --- an oracle network: logits -k (x - c)^2, so argmax = the nearest class to the image value --

class Oracle(nn.Module):
    """Image value c -> class c with confidence ~1; c + 0.4 -> class c with confidence 0.88."""

    def __init__(self, num_classes: int, k: float = 10.0):
        super().__init__()
        self.C, self.k = num_classes, k

    def forward(self, x):
        c = torch.arange(self.C, dtype=x.dtype).view(1, self.C, 1, 1, 1)
        return -self.k * (x - c) ** 2


def _case(with_label: bool = True):
    """4x4x4 voxels; truth: 32 background, 16 class 1, 12 class 2, 4 class 3. The image is the
    truth except: voxels 0-7 (bg) 0.4 (right, unconfident), 48-51 (class 2) 1.0 (confidently
    class 1), voxel 60 (class 3) 2.4 (class 2, unconfident)."""
    truth = np.zeros(64, np.int64)
    truth[32:48], truth[48:60], truth[60:] = 1, 2, 3
    image = truth.astype(np.float32)
    image[0:8], image[48:52], image[60] = 0.4, 1.0, 2.4
    item = {"image": torch.from_numpy(image).reshape(1, 4, 4, 4)}
    if with_label:
        item["label"] = torch.from_numpy(truth).reshape(1, 4, 4, 4)
    return item


def _cfg(tmp_path, method, *ov):
    return tiny_cfg(tmp_path, method, "data.patch_size=[4,4,4]", *ov)


PRIOR = torch.tensor([6.0, 2.0, 1.0, 1.0])  # unnormalised on purpose


def test_pseudo_label_report_by_hand_fixmatch(tmp_path):
    cfg = _cfg(tmp_path, "fixmatch")
    algo = build_algo("fixmatch", cfg, C)
    rep = pseudo_label_report(algo, Oracle(C), [_case(), _case()], cfg, CLASSES, PRIOR, torch.device("cpu"))
    assert rep["method"] == "fixmatch" and rep["classes"] == CLASSES and rep["num_cases"] == 2
    assert rep["threshold"] == pytest.approx(0.9)
    # confident: all but voxels 0-7 and 60 -> 55 of 64; labels [24, 20, 8, 3]; right [24, 16, 8, 3]
    assert rep["confident_fraction"] == pytest.approx(55 / 64)
    assert rep["pseudo_label_share"] == pytest.approx([24 / 55, 20 / 55, 8 / 55, 3 / 55])
    assert rep["true_share"] == pytest.approx([32 / 64, 16 / 64, 12 / 64, 4 / 64])
    assert rep["labeled_share"] == pytest.approx([0.6, 0.2, 0.1, 0.1])
    assert rep["pseudo_label_accuracy"] == pytest.approx(51 / 55)
    org = rep["organ_share"]
    assert org["labeled"] == pytest.approx([0.5, 0.25, 0.25])
    assert org["pseudo_label"] == pytest.approx([20 / 31, 8 / 31, 3 / 31])
    assert org["true"] == pytest.approx([16 / 32, 12 / 32, 4 / 32])
    assert algo.training  # handed back in train mode


def test_pseudo_label_report_supervised_keeps_every_argmax_voxel(tmp_path):
    cfg = _cfg(tmp_path, "supervised")
    algo = build_algo("supervised", cfg, C)
    rep = pseudo_label_report(algo, Oracle(C), [_case()], cfg, CLASSES, PRIOR, torch.device("cpu"))
    assert rep["threshold"] == 0.0 and rep["confident_fraction"] == 1.0
    # argmax labels [32, 20, 9, 3]; right [32, 16, 8, 3]
    assert rep["pseudo_label_share"] == pytest.approx([32 / 64, 20 / 64, 9 / 64, 3 / 64])
    assert rep["pseudo_label_accuracy"] == pytest.approx(59 / 64)
    assert "qhat" not in rep and "bias" not in rep  # no debiasing state to report


def test_pseudo_label_report_without_truth(tmp_path):
    cfg = _cfg(tmp_path, "fixmatch")
    algo = build_algo("fixmatch", cfg, C)
    rep = pseudo_label_report(algo, Oracle(C), [_case(), _case(with_label=False)], cfg, CLASSES,
                              PRIOR, torch.device("cpu"))
    assert rep["true_share"] is None and rep["pseudo_label_accuracy"] is None
    assert rep["organ_share"]["true"] is None
    assert rep["pseudo_label_share"] == pytest.approx([24 / 55, 20 / 55, 8 / 55, 3 / 55])


def test_pseudo_label_report_per_class_thresholds(tmp_path):
    cfg = _cfg(tmp_path, "fixmatch", "method.class_thresholds=true")
    algo = build_algo("fixmatch", cfg, C)
    thr = algo.thresholds()
    rep = pseudo_label_report(algo, Oracle(C), [_case()], cfg, CLASSES, PRIOR, torch.device("cpu"))
    assert isinstance(rep["threshold"], list) and len(rep["threshold"]) == C
    assert rep["threshold"] == pytest.approx(torch.as_tensor(thr).tolist())


def test_pseudo_label_report_debiaspl_reports_its_state_and_leaves_it_alone(tmp_path):
    cfg = _cfg(tmp_path, "debiaspl")
    algo = build_algo("debiaspl", cfg, C)
    before = {k: v.clone() for k, v in algo.method_state().items()}
    rep = pseudo_label_report(algo, Oracle(C), [_case()], cfg, CLASSES, PRIOR, torch.device("cpu"))
    # the report is a measurement: it must not move q̂ (nor any other method buffer)
    after = algo.method_state()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(rep["qhat"]) == C and sum(rep["qhat"]) == pytest.approx(1.0, abs=1e-5)
    assert len(rep["bias"]) == C and all(math.isfinite(b) for b in rep["bias"])
    assert sum(rep["pseudo_label_share"]) == pytest.approx(1.0)


# --- validate ------------------------------------------------------------------------------

def test_validate_dice_by_hand_nanmean_over_cases_and_nan_for_an_absent_organ(tmp_path):
    C5 = C + 1  # class 4 is in no case: its Dice is NaN
    cfg = _cfg(tmp_path, "supervised")
    a = _case()
    b_truth = a["label"].clone()
    b_truth[b_truth == 3] = 0      # case b has no class 3; the oracle gets it exactly right
    b = {"image": b_truth.float(), "label": b_truth}
    net = Oracle(C5).train()
    dice = validate(net, [a, b], cfg, C5, torch.device("cpu"))
    assert dice.shape == (C5 - 1,)
    # case a: prediction [32, 20, 9, 3] vs truth [32, 16, 12, 4] -> 2·16/36, 2·8/21, 2·3/7
    expect = [(32 / 36 + 1) / 2, (16 / 21 + 1) / 2, 6 / 7]   # class 3 NaN in case b: a's alone
    assert dice[:3] == pytest.approx(expect)
    assert np.isnan(dice[3])
    assert net.training  # validate restores the network's mode


# --- on a tiny prep with real networks -----------------------------------------------------

@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_tiny_prep(tmp_path_factory.mktemp("tinyprep_reports"), n_cases=4, labeled=1, eval_n=1)


def _eval_ds(prep, split):
    from medseg_dpl.data.pipelines import build_dataset
    from medseg_dpl.data.manifest import read_split
    return build_dataset(prep, read_split(prep, split), "eval", [32, 32, 32], C, 1, False)


def test_validate_on_the_tiny_prep(prep):
    cfg = tiny_cfg(prep, "supervised")
    algo = build_algo("supervised", cfg, C)
    dice = validate(algo.inference_network(), _eval_ds(prep, "eval"), cfg, C, torch.device("cpu"))
    assert dice.shape == (C - 1,) and dice.dtype == np.float64
    assert np.all((dice >= 0) & (dice <= 1))  # every organ is in every case: no NaN


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "debiaspl"])
def test_pseudo_label_report_on_the_tiny_prep(prep, method):
    # threshold 1/C: every voxel's max probability reaches it, so the shares are never all 0
    cfg = tiny_cfg(prep, method, "method.threshold=0.25")
    algo = build_algo(method, cfg, C)
    ds = _eval_ds(prep, "unlabeled_20p")
    prior = torch.tensor([0.7, 0.2, 0.07, 0.03])
    rep = pseudo_label_report(algo, algo.inference_network(), ds, cfg, CLASSES, prior, torch.device("cpu"))
    assert {"method", "classes", "threshold", "num_cases", "confident_fraction", "labeled_share",
            "pseudo_label_share", "true_share", "pseudo_label_accuracy", "organ_share"} <= set(rep)
    assert rep["method"] == method and rep["num_cases"] == len(ds) == 2
    assert 0.5 < rep["confident_fraction"] <= 1.0
    if method == "supervised":
        assert rep["confident_fraction"] == 1.0
    for key in ("labeled_share", "pseudo_label_share", "true_share"):
        assert len(rep[key]) == C
        assert sum(rep[key]) == pytest.approx(1.0, abs=1e-6), key
    assert rep["labeled_share"] == pytest.approx(prior.tolist())
    for key in ("labeled", "pseudo_label", "true"):
        shares = rep["organ_share"][key]
        assert len(shares) == C - 1
        assert sum(shares) == pytest.approx(1.0, abs=1e-6) or sum(shares) == 0
    assert sum(rep["organ_share"]["true"]) == pytest.approx(1.0)
    assert 0.0 <= rep["pseudo_label_accuracy"] <= 1.0
    if method == "debiaspl":
        assert len(rep["qhat"]) == C and len(rep["bias"]) == C
