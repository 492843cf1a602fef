"""Step-addressable training batches: the randomness of step k depends only on (seed, step, rank).

Batch k is built from scratch by ``StepBatches[k]``: which volumes (a ``DistributedSampler``
permutation per epoch, each rank its own share) and every random transform (MONAI transforms
re-seeded per item) are functions of (seed, k, rank). So a run resumed at step k draws exactly
the batches the uninterrupted run drew, whatever the number of loader workers, with no loader
state to save. A MONAI ``DataLoader`` over ``range(start, steps)`` prefetches in workers.

Teacher mode: each unlabeled crop also gets ``teacher_probs`` ``(C, *patch)`` cut from an external
model's whole-volume prediction at the same voxels (found through the crop's affine, so flips
and crops of the weak view are followed exactly).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, list_data_collate
from torch.utils.data import Dataset, DistributedSampler

from medseg_dpl.errors import MedsegError
from medseg_dpl.utils import seed_everything


class TeacherPredictionError(MedsegError, ValueError):
    """An external teacher prediction that is missing or does not fit its case."""


def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A 31-bit seed for (seed, step, rank, stream), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0] >> 1)


class _StepIndices:
    """Volume indices of the step's batch, DistributedSampler-style (each epoch a permutation
    seeded by (seed, epoch); rank r takes every world-th index)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=False)
        self.batch_size = batch_size
        self._epoch, self._order = -1, []

    def __call__(self, step: int) -> list[int]:
        per_epoch = len(self.sampler)
        out = []
        for j in range(self.batch_size):
            pos = step * self.batch_size + j
            epoch = pos // per_epoch
            if epoch != self._epoch:
                self.sampler.set_epoch(epoch)
                self._epoch, self._order = epoch, list(self.sampler)
            out.append(self._order[pos % per_epoch])
        return out


def _set_transform_seed(dataset: Dataset, s: int) -> None:
    seed_everything(s)  # transforms that draw from the global generators
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=s)


class TeacherVolumes:
    """External predictions of each case: ``DIR/<id>_probs.npz`` or ``DIR/<id>.nii.gz``.

    A 3D integer NIfTI is a label map: one-hot with label smoothing s, i.e. (1-s)·onehot + s/C
    (so the log is finite and a debiasing shift of a few nats can move a voxel across the
    threshold only where the teacher is not certain). A 4D float NIfTI ``(X, Y, Z, C)`` or
    ``(C, X, Y, Z)`` holds probabilities and is used as given (renormalised). NIfTI maps must
    lie on the preprocessed grid. A ``<id>_probs.npz`` (``medseg-dpl predict --save-probs``:
    softmax ``(C, X, Y, Z)`` + its ``affine``) may lie on any grid, e.g. the raw image's: it is
    resampled trilinearly onto the preprocessed grid through its affine (preferred when both exist).
    """

    def __init__(self, pred_dir: str, prep_dir: str, manifest: dict, num_classes: int,
                 smoothing: float):
        self.pred_dir, self.prep_dir = Path(pred_dir), Path(prep_dir)
        self.cases = {c["id"]: c for c in manifest["cases"]}
        self.num_classes, self.smoothing = num_classes, smoothing
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}

    def _npz(self, case_id: str) -> Path:
        return self.pred_dir / f"{case_id}_probs.npz"

    def check(self, ids: Sequence[str]) -> None:
        missing = [i for i in ids if not (self.pred_dir / f"{i}.nii.gz").is_file()
                   and not self._npz(i).is_file()]
        if missing:
            raise TeacherPredictionError(
                f"teacher.predictions: {len(missing)} unlabeled case(s) have no prediction in "
                f"{self.pred_dir}, e.g. {self.pred_dir / (missing[0] + '.nii.gz')} "
                f"(or {missing[0]}_probs.npz)")

    def volume(self, case_id: str):
        if case_id not in self._cache:
            path = self.pred_dir / f"{case_id}.nii.gz"
            img_path = self.prep_dir / self.cases[case_id]["image"]
            shape = tuple(nib.load(str(img_path)).shape[:3])
            affine = nib.load(str(img_path)).affine
            if self._npz(case_id).is_file():  # soft predictions on any grid -> the prep grid
                from medseg_dpl.evaluation.probabilities import (ProbsFileError, load_probs_npz,
                                                                 probs_on_grid)
                try:
                    probs, src_affine = load_probs_npz(self._npz(case_id))
                except ProbsFileError as exc:
                    raise TeacherPredictionError(str(exc)) from None
                if probs.shape[0] != self.num_classes:
                    raise TeacherPredictionError(f"{self._npz(case_id)}: {probs.shape[0]} classes, "
                                                 f"expected {self.num_classes}")
                self._cache[case_id] = (probs_on_grid(probs, src_affine, shape, affine), affine, False)
                return self._cache[case_id]
            arr = np.asanyarray(nib.load(str(path)).dataobj)
            is_labels = arr.ndim == 3
            if not is_labels and arr.shape[:3] == shape:   # (X, Y, Z, C)
                arr = np.moveaxis(arr, -1, 0)
            spatial = arr.shape if is_labels else arr.shape[1:]
            if tuple(spatial) != shape or (not is_labels and arr.shape[0] != self.num_classes):
                raise TeacherPredictionError(
                    f"{path}: shape {arr.shape} does not fit case {case_id} (image grid {shape}, "
                    f"{self.num_classes} classes); predictions must be on the preprocessed grid")
            if is_labels:
                if arr.min() < 0 or arr.max() >= self.num_classes:
                    raise TeacherPredictionError(f"{path}: labels outside [0, {self.num_classes})")
                arr = arr.astype(np.uint8)
            else:
                arr = arr.astype(np.float16)
            self._cache[case_id] = (arr, affine, is_labels)
        return self._cache[case_id]

    def crop(self, case_id: str, crop_affine: np.ndarray, patch: Sequence[int]) -> torch.Tensor:
        """Teacher probabilities ``(C, *patch)`` at the voxels of a crop with ``crop_affine``."""
        arr, affine, is_labels = self.volume(case_id)
        vox = np.linalg.inv(affine) @ np.asarray(crop_affine, dtype=np.float64)
        grid = np.stack(np.meshgrid(*[np.arange(p) for p in patch], indexing="ij"), 0).reshape(3, -1)
        idx = np.rint(vox[:3, :3] @ grid + vox[:3, 3:]).astype(np.int64)
        spatial = arr.shape if is_labels else arr.shape[1:]
        inside = np.all((idx >= 0) & (idx < np.asarray(spatial)[:, None]), axis=0)
        idx = np.clip(idx, 0, np.asarray(spatial)[:, None] - 1)
        C = self.num_classes
        if is_labels:
            lab = torch.from_numpy(arr[idx[0], idx[1], idx[2]].astype(np.int64))
            probs = torch.nn.functional.one_hot(lab, C).T.float()
            probs = probs * (1 - self.smoothing) + self.smoothing / C
        else:
            probs = torch.from_numpy(arr[:, idx[0], idx[1], idx[2]].astype(np.float32))
            probs = probs / probs.sum(0, keepdim=True).clamp_min(1e-8)
        probs[:, ~torch.from_numpy(inside)] = 1.0 / C  # padding: uniform, never confident
        return probs.reshape(C, *patch)


class StepBatches(Dataset):
    """``self[k]`` = the collated batch of step ``k`` for each named source.

    ``sources``: name -> (dataset, ids, volumes per step). Items are MONAI dicts (or lists of
    ``num_samples`` dicts from positive/negative crop sampling); all crops are collated.
    """

    def __init__(self, sources: dict, seed: int, rank: int = 0, world: int = 1,
                 teacher: Optional[TeacherVolumes] = None, patch_size: Sequence[int] = ()):
        self.sources = sources
        self.seed, self.rank = seed, rank
        self.indices = {name: _StepIndices(len(ds), bs, seed, rank, world)
                        for name, (ds, _ids, bs) in sources.items()}
        self.teacher, self.patch_size = teacher, list(patch_size)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> dict:
        out = {}
        for stream, (name, (ds, ids, _bs)) in enumerate(self.sources.items()):
            items = []
            for j, i in enumerate(self.indices[name](step)):
                _set_transform_seed(ds, step_seed(self.seed, step, self.rank, 100 * stream + j))
                item = ds[i]
                for crop in (item if isinstance(item, list) else [item]):
                    if self.teacher is not None and name == "unlabeled":
                        aff = crop["image_weak"].affine.numpy()
                        crop["teacher_probs"] = self.teacher.crop(ids[i], aff, self.patch_size)
                    crop.pop("id", None)
                    items.append(crop)
            out[name] = list_data_collate(items)
        return out


def _identity(x):
    return x


def step_loader(batches: StepBatches, start: int, steps: int, num_workers: int) -> DataLoader:
    """Batches of steps ``start .. steps-1`` in order, prefetched by ``num_workers`` workers."""
    return DataLoader(batches, batch_size=None, sampler=range(start, steps), num_workers=num_workers,
                      collate_fn=_identity, persistent_workers=False)
