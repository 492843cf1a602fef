"""What the trainer does around each step, as hooks (USB/semilearn's design).

A hook gets the :class:`~medseg_dpl.engine.trainer.Trainer` (its ``cfg``, ``algo``, ``rank``,
``writer``, ``log``, run state) at three points: ``before_run``, ``after_step(trainer, out)``
with the step's :class:`~medseg_dpl.methods.base.StepResult` (``trainer.done`` steps are
finished), and ``after_run``. The trainer calls them in the order of its ``hooks`` list:
EMA update -> logging -> validation (+ best model) -> checkpoint -> (at the end) reports.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from medseg_dpl.core.ema import unwrap
from medseg_dpl.engine.reports import CropPseudoLabelStats, pseudo_label_report, validate
from medseg_dpl.utils import atomic_path


class Hook:
    """No-op base: override what you need."""

    def before_run(self, trainer) -> None:
        pass

    def after_step(self, trainer, out) -> None:
        pass

    def after_run(self, trainer) -> None:
        pass

    def close(self) -> None:
        """Release resources (also when the run stops on an error)."""


class EMAHook(Hook):
    """The EMA teacher follows the student after every optimiser step."""

    def after_step(self, trainer, out) -> None:
        if trainer.teacher is not None:
            trainer.teacher.update(trainer.algo.student, trainer.done - 1)


def _is_vector(v) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim > 0


class LoggingHook(Hook):
    """Scalars and per-class curves (means over ``train.log_every`` steps) to TensorBoard and
    ``train.log``, crop-level pseudo-label statistics, a progress bar on a terminal (a plain
    line per log step when the output is redirected)."""

    bar = None   # until before_run

    def before_run(self, trainer) -> None:
        t, name = trainer.cfg["train"], trainer.cfg["method"]["name"]
        on_tty = sys.stderr.isatty()
        self.bar = tqdm(total=t["steps"], initial=trainer.start, dynamic_ncols=True, desc=f"train {name}",
                        disable=trainer.rank != 0 or not t["progress"] or not on_tty)
        self.echo = trainer.rank == 0 and t["progress"] and not on_tty
        self.crop_stats = CropPseudoLabelStats(len(trainer.classes))
        self.acc: dict[str, list] = {}
        self.tic = time.perf_counter()
        if trainer.rank == 0 and trainer.start == 0:
            d = trainer.data
            trainer.log.info(
                f"method {name} on {d.root}: {len(d.labeled_ids)} labeled, {len(d.unlabeled_ids)} "
                f"unlabeled, {len(d.eval_ids)} eval cases; {trainer.world} process(es) on {trainer.device}")
            trainer.log.info("labeled class share pi: " + ", ".join(
                f"{c}={v:.4f}" for c, v in zip(trainer.classes, d.prior.tolist())))
            for c, v in zip(trainer.classes, d.prior.tolist()):
                trainer.writer.add_scalar(f"labeled_share/{c}", v, 0)

    def say(self, trainer, line: str) -> None:
        trainer.log.info(line)
        if self.echo:
            print(f"[{trainer.cfg['method']['name']}] {line}", flush=True)

    def after_step(self, trainer, out) -> None:
        self.bar.update(1)
        self.acc.setdefault("loss/total", []).append(float(out.loss.detach()))
        if out.pseudo_labels is not None:
            truth = trainer.truth[:, 0] if trainer.truth is not None else None
            self.crop_stats.add(out.pseudo_labels, out.mask, truth)
        for k, v in {**out.scalars, **out.per_class}.items():
            self.acc.setdefault(k, []).append(v.detach().float().cpu() if isinstance(v, torch.Tensor) else float(v))
        every, done = trainer.cfg["train"]["log_every"], trainer.done
        if done % every == 0 or done == trainer.steps:
            if trainer.rank == 0:
                self.write(trainer)
            self.acc, self.tic = {}, time.perf_counter()

    def write(self, trainer) -> None:
        done, w = trainer.done, trainer.writer
        scalars = {k: float(np.mean([float(x) for x in v])) for k, v in self.acc.items() if not _is_vector(v[0])}
        scalars["lr"] = trainer.lr
        scalars["sec_per_step"] = (time.perf_counter() - self.tic) / len(self.acc["loss/total"])
        for k, v in scalars.items():
            w.add_scalar(k, v, done)
        line = f"step {done}/{trainer.steps} " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        for k, v in self.acc.items():
            if _is_vector(v[0]):  # (C,): a curve per class
                vec = torch.stack(v).mean(0)
                for c, x in zip(trainer.classes, vec.tolist()):
                    w.add_scalar(f"{k}/{c}", x, done)
                line += f" {k}=[" + " ".join(f"{x:.3f}" for x in vec.tolist()) + "]"
        if self.crop_stats.pl.sum() > 0:
            crop = self.crop_stats.summary()
            trainer.crop_history.append({"step": done, **crop})
            for key, vec in crop.items():
                names = trainer.classes[1:] if key.endswith("share") else trainer.classes
                for c, x in zip(names, vec):
                    if np.isfinite(x):
                        w.add_scalar(f"crop_pl_{key}/{c}", x, done)
        self.say(trainer, line)
        self.bar.set_postfix(loss=f"{scalars['loss/total']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ValidationHook(Hook):
    """Every ``train.val_every`` steps and at the end: per-organ Dice of the inference network
    on the eval volumes; a new best mean is saved as ``checkpoints/best.pt``."""

    def __init__(self, logger: LoggingHook):
        self.logger = logger

    def after_step(self, trainer, out) -> None:
        done = trainer.done
        if done % trainer.cfg["train"]["val_every"] and done != trainer.steps:
            return
        if trainer.rank == 0:
            dice = trainer.validate()
            mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
            organs = trainer.classes[1:]
            for c, v in zip(organs, dice.tolist()):
                trainer.writer.add_scalar(f"val_dice/{c}", v, done)
            trainer.writer.add_scalar("val_dice/mean", mean, done)
            trainer.history.append({"step": done, "dice_mean": mean,
                                    "dice": {c: float(v) for c, v in zip(organs, dice.tolist())}})
            self.logger.say(trainer, f"validation step {done}: mean Dice {mean:.4f} | " +
                            " ".join(f"{c}={v:.3f}" for c, v in zip(organs, dice.tolist())))
            if mean > trainer.best:
                trainer.best, trainer.best_step = mean, done
                trainer.save("best")
                trainer.log.info(f"new best {mean:.4f} at step {done}")
        trainer.barrier()


class CheckpointHook(Hook):
    """``checkpoints/last.pt`` every ``train.checkpoint_every`` steps and at the end."""

    def after_step(self, trainer, out) -> None:
        if trainer.rank == 0 and (trainer.done % trainer.cfg["train"]["checkpoint_every"] == 0
                                  or trainer.done == trainer.steps):
            trainer.save("last")


class ReportHook(Hook):
    """At the end (rank 0): final Dice, ``pseudo_labels.json`` over the whole unlabeled
    volumes, ``metrics.json``, and the post-processing decision on the eval split."""

    def after_run(self, trainer) -> None:
        if trainer.rank != 0:
            return
        cfg, d, res = trainer.cfg, trainer.data, trainer.result
        last = trainer.last_dice if trainer.last_dice is not None else trainer.validate()
        res["final_dice"] = {c: float(v) for c, v in zip(trainer.classes[1:], last.tolist())}
        res["final_dice_mean"] = float(np.nanmean(last)) if np.isfinite(last).any() else 0.0
        report = pseudo_label_report(trainer.algo, unwrap(trainer.algo.inference_network()), d.report_dataset(),
                                     cfg, trainer.classes, d.prior, trainer.device)
        report["crop_history"] = trainer.crop_history  # confident pseudo-labels of the training crops
        out_dir = trainer.out_dir
        with atomic_path(out_dir / "pseudo_labels.json") as tmp:
            tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
        res["pseudo_labels"] = str(out_dir / "pseudo_labels.json")
        trainer.log.info(f"done: best mean Dice {trainer.best:.4f} at step {trainer.best_step}; final "
                         f"{res['final_dice_mean']:.4f}; pseudo-label share {report['pseudo_label_share']}")
        with atomic_path(out_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(res, indent=1), encoding="utf-8")
        if cfg["eval"]["postprocess"]:  # per-organ component rules that eval/predict apply
            from medseg_dpl.evaluation.run_postprocess import postprocess_run
            postprocess_run(out_dir, data_dir=d.root, device=trainer.device, progress=False)
