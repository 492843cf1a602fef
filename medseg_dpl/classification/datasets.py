"""Image sets for semi-supervised classification: embedded digits, or any ImageFolder folder.

Everything a trainer needs is a :class:`ClassificationData`: a labeled, an unlabeled and a
held-out test :class:`ImageSet`. Images are float32 ``(C, H, W)`` in [0, 1]; labels are ints.
The unlabeled set keeps its true labels, used only to *measure* pseudo-label accuracy.

Folders are read with PIL and numpy (torchvision is not required): ``root/<class>/<image>``,
classes sorted by name, images sorted by path within a class, as torchvision's ImageFolder.
A labeled-index file selects the labeled images as in the paper's ImageNet 0.2 %/1 % protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from medseg_dpl.errors import MedsegError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(MedsegError, ValueError):
    """A data folder, index file or logits file that cannot be used; names the path."""


class ImageSet(Dataset):
    """``ds[i] -> (image (C, H, W) float32, label int, i)``; ``ds.labels`` is a long ``(N,)``."""

    labels: torch.Tensor

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)``, labels ``(B,)``, indices ``(B,)`` for a long ``(B,)`` index."""
        items = [self[int(i)] for i in index]
        return (torch.stack([x for x, _, _ in items]), self.labels[index], index)


class TensorImageSet(ImageSet):
    """Images held in memory as one ``(N, C, H, W)`` tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images {tuple(images.shape)} / labels {tuple(labels.shape)}")
        self.images = images.float()
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), i

    def batch(self, index):
        return self.images[index], self.labels[index], index


class FolderImageSet(ImageSet):
    """Images read lazily from files: resized (shorter side) to ``size`` and center-cropped."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], size: int, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return read_image(self.paths[i], self.size, self.channels), int(self.labels[i]), i


def read_image(path: Path, size: int, channels: int = 3) -> torch.Tensor:
    """One image file -> float32 ``(channels, size, size)`` in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read image: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def subset(ds: ImageSet, index: Sequence[int]) -> ImageSet:
    """The images of ``ds`` at ``index`` (in that order), same type."""
    index = torch.as_tensor(np.asarray(index, dtype=np.int64))
    if isinstance(ds, TensorImageSet):
        return TensorImageSet(ds.images[index], ds.labels[index])
    if isinstance(ds, FolderImageSet):
        return FolderImageSet([ds.paths[i] for i in index.tolist()], ds.labels[index].tolist(),
                              ds.size, ds.channels)
    raise TypeError(type(ds).__name__)


@dataclass
class ClassificationData:
    """The three parts of a semi-supervised classification problem.

    ``unlabeled_index`` gives, for each unlabeled image (in order), its index in the full
    training list; a teacher logits file has one row per unlabeled image in this order.
    """

    classes: list[str]
    labeled: ImageSet
    unlabeled: ImageSet
    test: ImageSet
    unlabeled_index: np.ndarray
    labeled_index: np.ndarray
    names: Optional[list[str]] = None  # per training image (folder: relative path)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.test[0][0].shape[0])

    @property
    def image_size(self) -> int:
        return int(self.test[0][0].shape[-1])


def _stratified_pick(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                     what: str) -> np.ndarray:
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise DatasetError(f"{what}: class {c} has {len(members)} images, "
                               f"fewer than the {per_class} requested")
        picked.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _stratified_fraction(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """At least one image per class (if the class has two), ``fraction`` of each class."""
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(len(members) - 1, max(1, round(fraction * len(members))))
        if n > 0:
            picked.append(rng.choice(members, n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def load_digits_data(labels_per_class: int, seed: int, test_fraction: float = 0.3,
                     test_seed: int = 0) -> ClassificationData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download).

    The held-out test part (``test_fraction``, stratified, fixed by ``test_seed``) is the same
    for every ``seed``; ``seed`` picks ``labels_per_class`` labeled images per class from the rest,
    every other training image is unlabeled.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8)
    labels = digits.target.astype(np.int64)
    test_idx = _stratified_fraction(labels, test_fraction, np.random.default_rng(test_seed))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    lab_local = _stratified_pick(labels[train_idx], labels_per_class,
                                 np.random.default_rng(seed), "digits")
    unl_local = np.setdiff1d(np.arange(len(train_idx)), lab_local)
    full = TensorImageSet(images, torch.from_numpy(labels))
    train = subset(full, train_idx)
    return ClassificationData(classes=[str(d) for d in range(10)],
                              labeled=subset(train, lab_local), unlabeled=subset(train, unl_local),
                              test=subset(full, test_idx), unlabeled_index=unl_local,
                              labeled_index=lab_local,
                              names=[f"digits:{i}" for i in train_idx])


def scan_image_folder(root: str | Path) -> tuple[list[str], list[Path], list[int]]:
    """``root/<class>/**/<image>`` -> (classes, paths, labels), sorted as torchvision's ImageFolder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"image folder {root}: no class sub-folders (expected root/<class>/<image>)")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise DatasetError(f"image folder {root}: no images with extensions {IMAGE_EXTENSIONS}")
    return classes, paths, labels


def read_labeled_index(path: str | Path, root: str | Path, paths: Sequence[Path]) -> np.ndarray:
    """Indices (into the sorted sample list) of the labeled images listed in ``path``.

    One entry per line (blank lines and ``#`` comments skipped; in a ``.csv`` the first column,
    a non-numeric header allowed): an integer index into the sorted samples of ``root``, a path
    relative to ``root`` (``n01440764/n01440764_10026.JPEG``), or a bare file name
    (``n01440764_10026.JPEG``, as in the SimCLR 1 %/10 % lists) that is unique in the folder.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DatasetError(f"labeled index file {path} does not exist")
    rel = {p.relative_to(root).as_posix(): i for i, p in enumerate(paths)}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_name.setdefault(p.name, []).append(i)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if path.suffix.lower() == ".csv":
            entry = entry.split(",", 1)[0].strip()
        if not entry:
            continue
        if entry.lstrip("-").isdigit():
            i = int(entry)
            if not 0 <= i < len(paths):
                raise DatasetError(f"{path}:{lineno}: index {i} outside 0..{len(paths) - 1} "
                                   f"(the images of {root})")
            out.append(i)
        elif entry in rel:
            out.append(rel[entry])
        elif len(by_name.get(entry, [])) == 1:
            out.append(by_name[entry][0])
        elif path.suffix.lower() == ".csv" and not out and lineno == 1:
            continue  # a header
        else:
            why = "is ambiguous" if entry in by_name else "is not an image"
            raise DatasetError(f"{path}:{lineno}: {entry!r} {why} under {root}")
    if not out:
        raise DatasetError(f"{path}: lists no images")
    return np.unique(np.asarray(out, dtype=np.int64))


def load_folder_data(root: str | Path, image_size: int, seed: int, labeled_index=None,
                     labels_per_class: int = 2, test_root=None, test_fraction: float = 0.3,
                     test_seed: int = 0, channels: int = 3) -> ClassificationData:
    """An ImageFolder-style folder as a semi-supervised problem.

    Labeled: the images listed in ``labeled_index`` or else ``labels_per_class`` per class
    (drawn with ``seed``). Test: ``test_root`` (same class names) or else a stratified
    ``test_fraction`` of the non-labeled images (fixed by ``test_seed``). Unlabeled: the rest.
    """
    classes, paths, labels = scan_image_folder(root)
    labels_np = np.asarray(labels)
    full = FolderImageSet(paths, labels, image_size, channels)
    if labeled_index is not None:
        lab = read_labeled_index(labeled_index, root, paths)
    else:
        lab = None
    if test_root is not None:
        test_classes, test_paths, test_labels = scan_image_folder(test_root)
        missing = sorted(set(test_classes) - set(classes))
        if missing:
            raise DatasetError(f"test folder {test_root}: classes {missing} not in {root}")
        test_labels = [classes.index(test_classes[t]) for t in test_labels]
        test = FolderImageSet(test_paths, test_labels, image_size, channels)
        train_idx = np.arange(len(paths))
    else:
        candidates = np.setdiff1d(np.arange(len(paths)), lab if lab is not None else [])
        test_idx = candidates[_stratified_fraction(labels_np[candidates], test_fraction,
                                                   np.random.default_rng(test_seed))]
        test = subset(full, test_idx)
        train_idx = np.setdiff1d(np.arange(len(paths)), test_idx)
    if lab is None:
        lab = train_idx[_stratified_pick(labels_np[train_idx], labels_per_class,
                                         np.random.default_rng(seed), str(root))]
    unl = np.setdiff1d(train_idx, lab)
    if len(unl) == 0:
        raise DatasetError(f"{root}: no unlabeled images left")
    names = [p.relative_to(Path(root)).as_posix() for p in paths]
    return ClassificationData(classes=classes, labeled=subset(full, lab), unlabeled=subset(full, unl),
                              test=test, unlabeled_index=unl, labeled_index=lab, names=names)


def build_data(cfg: dict) -> ClassificationData:
    """The data a classify config asks for (``cfg["data"]``, ``cfg["train"]["seed"]``)."""
    d = cfg["data"]
    if d["dataset"] == "digits":
        return load_digits_data(d["labels_per_class"], cfg["train"]["seed"],
                                d["test_fraction"], d["test_seed"])
    if d["dataset"] == "folder":
        if not d["root"]:
            raise DatasetError("data.root: required for data.dataset=folder")
        return load_folder_data(d["root"], d["image_size"], cfg["train"]["seed"],
                                d["labeled_index"], d["labels_per_class"], d["test_root"],
                                d["test_fraction"], d["test_seed"], d["channels"])
    raise DatasetError(f"data.dataset: unknown data set {d['dataset']!r} (digits, folder)")


def infinite_batches(ds: ImageSet, batch_size: int, generator: torch.Generator,
                     num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless random batches ``(images (B,C,H,W), labels (B,), indices (B,))`` of ``ds``.

    In-memory sets are indexed directly (a DataLoader's per-item overhead would dominate a step
    on 8x8 digits); folder sets go through a DataLoader so workers can decode images.
    """
    if isinstance(ds, TensorImageSet):
        while True:
            idx = torch.randint(len(ds), (batch_size,), generator=generator)
            yield ds.batch(idx)
    sampler = RandomSampler(ds, replacement=True, num_samples=batch_size * 10_000,
                            generator=generator)
    while True:
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            drop_last=True, persistent_workers=False)
        for x, y, i in loader:
            yield x, y, i


def ordered_batches(ds: ImageSet, batch_size: int, num_workers: int = 0):
    """The whole set once, in order: ``(images, labels, indices)`` batches (for evaluation)."""
    if isinstance(ds, TensorImageSet):
        for start in range(0, len(ds), batch_size):
            yield ds.batch(torch.arange(start, min(start + batch_size, len(ds))))
        return
    yield from DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
