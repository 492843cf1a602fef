"""Adding a method is one class plus its registry entry: a toy method (the student learns the
supervised loss plus an entropy penalty on unlabeled crops) trains end to end through the one
trainer, with its scalars and per-class curves logged and a resumable checkpoint."""
import torch

from train_helpers import make_tiny_prep, tiny_cfg

from medseg_dpl.methods import METHODS
from medseg_dpl.methods.base import Algorithm, StepResult


class EntropyMin(Algorithm):
    name = "entropy_min"
    uses_unlabeled = True
    uses_teacher = True

    def train_step(self, batch, step):
        sup = self.supervised_loss(self.student(batch["image"]), batch["label"])
        probs = torch.softmax(self.student(batch["image_weak"]), 1)
        ent = -(probs * torch.log(probs.clamp_min(1e-8))).sum(1).mean()
        share = probs.detach().mean(dim=(0, *range(2, probs.ndim)))
        return StepResult(sup + self.unsup_weight(step) * ent, {"loss/sup": sup.detach(), "entropy": ent.detach()},
                          {"prob_share": share})


def test_a_registered_toy_method_trains_through_the_trainer(tmp_path, monkeypatch):
    from medseg_dpl.engine.trainer import train

    monkeypatch.setitem(METHODS, EntropyMin.name, EntropyMin)
    prep = make_tiny_prep(tmp_path / "prep", n_cases=6)
    run = tmp_path / "run"
    res = train(tiny_cfg(prep, "entropy_min", "train.steps=4", "train.val_every=2", "train.checkpoint_every=2",
                         "eval.postprocess=false"), run)
    assert res["step"] == 4 and len(res["val_history"]) == 2
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "entropy=" in log and "prob_share=[" in log
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["kind"] == "segmentation" and ck["step"] == 4 and ck["teacher"] is not None
    assert (run / "pseudo_labels.json").is_file()
