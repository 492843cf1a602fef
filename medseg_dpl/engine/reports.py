"""What the trainer measures besides the loss: validation Dice, pseudo-label reports.

* :func:`validate`: per-organ Dice of a network on whole eval volumes (sliding windows).
* :func:`pseudo_label_report`: the final model's pseudo-labels over whole unlabeled volumes
  (``pseudo_labels.json``).
* :class:`CropPseudoLabelStats`: the pseudo-labels the student actually trains on, at crop
  level, against the unlabeled crops' truth where the data set has it (the phantom does):
  per-organ share of confident pseudo-labels vs the true share, precision and recall.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from medseg_dpl.core.debias import pseudo_labels


@torch.no_grad()
def _predict_probs(net: nn.Module, image: torch.Tensor, cfg: dict, device: torch.device) -> torch.Tensor:
    from medseg_dpl.evaluation.inference import sliding_window_predict
    was = net.training
    net.eval()
    try:
        return sliding_window_predict(net, image[None].to(device), cfg["data"]["patch_size"],
                                      overlap=cfg["eval"]["overlap"],
                                      sw_batch_size=cfg["eval"]["sw_batch_size"],
                                      amp=cfg["train"]["amp"] != "none")[0]
    finally:
        net.train(was)


def validate(net: nn.Module, dataset, cfg: dict, num_classes: int, device: torch.device) -> np.ndarray:
    """Per-organ Dice ``(C-1,)`` averaged over the eval cases (NaN: organ absent everywhere)."""
    from medseg_dpl.evaluation.metrics import dice_per_class
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        pred = _predict_probs(net, item["image"].as_tensor() if hasattr(item["image"], "as_tensor")
                              else item["image"], cfg, device).argmax(0).cpu().numpy()
        rows.append(dice_per_class(pred, np.asarray(item["label"][0]).astype(np.int64), num_classes))
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(rows), axis=0)


@torch.no_grad()
def pseudo_label_report(algo, net: nn.Module, dataset, cfg: dict, classes: list[str],
                        prior: torch.Tensor, device: torch.device) -> dict:
    """Class distribution of the final model's pseudo-labels over whole unlabeled volumes.

    ``dataset`` items: ``image`` ``(1, X, Y, Z)`` (and ``label`` when known). Pseudo-labels are
    the method's own (``algo.pseudo_label_probs``: debiased for debiaspl/cps_depl, plain softmax
    for fixmatch) thresholded at ``method.threshold``; for ``supervised`` every argmax voxel.
    """
    C = len(classes)
    thr = 0.0
    if algo.uses_unlabeled:  # the method's own threshold(s): a float or per-class (C,)
        thr = algo.thresholds()
    pl_counts, true_counts = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    correct = kept = total = 0
    has_truth = True
    algo.eval()
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"].as_tensor() if hasattr(item["image"], "as_tensor") else item["image"]
        probs = _predict_probs(net, image, cfg, device)[None]
        probs = algo.pseudo_label_probs(torch.log(probs.clamp_min(1e-12)))  # log p = z + const
        labels, mask = pseudo_labels(probs, thr)
        labels, mask = labels[0].cpu(), mask[0].cpu()
        pl_counts += torch.bincount(labels[mask], minlength=C).double()
        kept += int(mask.sum())
        total += mask.numel()
        if item.get("label") is not None:
            truth = torch.as_tensor(np.asarray(item["label"][0])).long()
            true_counts += torch.bincount(truth.reshape(-1), minlength=C).double()
            correct += int((labels[mask] == truth[mask]).sum())
        else:
            has_truth = False
    algo.train()

    def share(c):
        return [float(v) for v in (c / c.sum().clamp_min(1e-12))]

    def organ_share(c):
        c = c[1:]
        return [float(v) for v in (c / c.sum().clamp_min(1e-12))]

    report = {"method": algo.name, "classes": list(classes),
              "threshold": thr.tolist() if isinstance(thr, torch.Tensor) else thr,
              "num_cases": len(dataset), "confident_fraction": kept / max(total, 1),
              "labeled_share": share(prior.double()), "pseudo_label_share": share(pl_counts),
              "true_share": share(true_counts) if has_truth else None,
              "pseudo_label_accuracy": correct / max(kept, 1) if has_truth else None,
              "organ_share": {"labeled": organ_share(prior.double()),
                              "pseudo_label": organ_share(pl_counts),
                              "true": organ_share(true_counts) if has_truth else None}}
    report.update(algo.state_report())   # e.g. q̂ and the bias of the debiasing methods
    return report


class CropPseudoLabelStats:
    """Accumulates confident pseudo-labels of training crops against their truth.

    ``add(labels, mask, truth)``: ``labels`` long ``(U, *patch)``, ``mask`` bool ``(U, *patch)``,
    ``truth`` long ``(U, *patch)`` or None. ``summary()`` returns per-class ``(C,)`` lists:
    ``pl_share`` (share of the confident organ pseudo-labels, background excluded),
    ``true_share`` (same over the truth of the same crops), ``precision`` and ``recall`` of the
    confident pseudo-labels per class (NaN where undefined), then resets.
    """

    def __init__(self, num_classes: int):
        self.C = num_classes
        self.reset()

    def reset(self) -> None:
        z = lambda: torch.zeros(self.C, dtype=torch.float64)  # noqa: E731
        self.pl, self.true, self.tp, self.true_all = z(), z(), z(), z()
        self.has_truth = False

    @torch.no_grad()
    def add(self, labels: torch.Tensor, mask: torch.Tensor, truth: Optional[torch.Tensor]) -> None:
        labels, mask = labels.detach().cpu(), mask.detach().cpu()
        self.pl += torch.bincount(labels[mask], minlength=self.C).double()
        if truth is not None:
            truth = truth.detach().cpu().reshape(labels.shape).long()
            self.has_truth = True
            self.true_all += torch.bincount(truth.reshape(-1), minlength=self.C).double()
            hit = mask & (labels == truth)
            self.tp += torch.bincount(labels[hit], minlength=self.C).double()

    def summary(self) -> dict:
        def organ_share(c):
            return (c[1:] / c[1:].sum().clamp_min(1e-12)).tolist()

        with np.errstate(all="ignore"):
            out = {"pl_share": organ_share(self.pl)}
            if self.has_truth:
                out["true_share"] = organ_share(self.true_all)
                out["precision"] = (self.tp / self.pl).tolist()        # NaN: no pseudo-label
                out["recall"] = (self.tp / self.true_all).tolist()     # NaN: class absent
        self.reset()
        return out
