"""The package transforms an exported bundle's ``inference.json`` names.

The bundle rebuilds ``medseg-dpl predict`` from MONAI components (``LoadImaged``,
``Orientationd``, ``SpatialResample``, ``CropForegroundd``, ``ScaleIntensityRanged``,
``SlidingWindowInferer``, ``Activationsd``, ``KeepLargestConnectedComponentd``, ``SaveImaged``).
The steps below have no exact MONAI equivalent. Each is a thin wrapper around the package
function that ``predict`` calls, so the config copies no code:

* :class:`PrepSpacingd`: prep's target grid. MONAI's ``Spacingd`` places its grid differently
  (first voxel centre kept, or the extent scaled by ``n/n'``). Prep uses ``n' = round(n·s/s')``
  with the field of view centred. MONAI's ``SpatialResample`` resamples onto that grid (spline
  order 1 with edge replication, which is prep's linear resampling);
* :class:`BodyMaskd`: prep's body region (the CT body box, or the Otsu MR body mask). MONAI's
  ``CropForegroundd`` crops it with prep's margin;
* :class:`MRZScored`: MR z-score over the body voxels after clipping to percentiles of the
  body voxels;
* :class:`ResampleToSourced`: class probabilities on the model grid -> labels on the input's
  own voxels, as predict does it. MONAI's ``Invertd`` blends the crop's zero padding into the
  edge voxels and replicates past the field of view, so a few border voxels would differ;
* :class:`RemoveSmallComponentsd`: the ``remove_small`` post-processing rule (components below
  a fraction of the organ's largest one). MONAI's ``RemoveSmallObjects`` takes an absolute size;
* :class:`FlipTTAInferer`: predict's 8-flip test-time augmentation, for runs that enabled it;
* :class:`DicomSeriesReader` and :func:`list_cases`: DICOM series through SimpleITK, as predict
  reads them (MONAI's DICOM readers need ITK or pydicom), and predict's input rules.
"""
from __future__ import annotations

import os
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.inferers import Inferer
from monai.transforms import InvertibleTransform, MapTransform, SpatialResample
from monai.utils import convert_to_dst_type, ensure_tuple


def prep_grid(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]
              ) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid prep resamples a RAS volume of ``shape`` ``(X, Y, Z)`` and ``affine`` onto.

    Returns ``(shape', affine')`` with ``shape'`` = round(n·s/s') per axis. Voxel centres sit at
    ``src = (dst + 0.5)·s'/s - 0.5``, and an axis already at the target spacing is unchanged
    (``medseg_dpl.data.preprocess.resample``).
    """
    from medseg_dpl.data.io import voxel_spacing
    from medseg_dpl.data.preprocess import _target_shape

    affine = np.asarray(affine, dtype=np.float64)
    new_shape, ratio = _target_shape(shape, voxel_spacing(affine), np.asarray(spacing, np.float64))
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = 0.5 * ratio - 0.5
    return tuple(int(n) for n in new_shape), affine @ step


def _like(array: np.ndarray, ref) -> MetaTensor:
    """``array`` as a tensor carrying ``ref``'s metadata (affine, file name, ...)."""
    return convert_to_dst_type(array, ref)[0] if isinstance(ref, MetaTensor) else torch.as_tensor(array)


class PrepSpacingd(MapTransform, InvertibleTransform):
    """Resample ``(1, X, Y, Z)`` RAS images onto prep's grid at ``pixdim`` mm (:func:`prep_grid`).

    MONAI's ``SpatialResample`` does the interpolation (spline order 1 in float64, edges
    replicated: prep's linear resampling) and records it, so ``Invertd`` can undo it.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.pixdim = [float(p) for p in pixdim]
        self.resampler = SpatialResample(mode=1, padding_mode="nearest", dtype=torch.float64)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            shape, affine = prep_grid(img.shape[1:], np.asarray(img.affine, np.float64), self.pixdim)
            d[key] = self.resampler(img, dst_affine=torch.as_tensor(affine), spatial_size=shape)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d


class BodyMaskd(MapTransform):
    """Add ``mask_key``: prep's body region of a ``(1, X, Y, Z)`` RAS image resampled by prep.

    CT (HU): the bounding box of the largest 6-connected component above -500 HU
    (``body_box``, margin 0). MR: the Otsu body mask (``mr_body_mask``), which the z-score
    also needs. ``CropForegroundd(source_key=mask_key, margin=prep's margin in voxels,
    allow_smaller=True)`` then crops exactly prep's box. Output: bool ``(1, X, Y, Z)``.
    """

    def __init__(self, keys: KeysCollection, modality: str = "ct", mask_key: str = "body",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if modality not in ("ct", "mr"):
            raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
        self.modality, self.mask_key = modality, mask_key

    def body(self, image: np.ndarray) -> np.ndarray:
        """``(X, Y, Z)`` image -> bool ``(X, Y, Z)`` body region."""
        from medseg_dpl.data.preprocess import body_box, mr_body_mask

        if self.modality == "mr":
            return mr_body_mask(image)
        box = body_box(image, (1.0, 1.0, 1.0), margin_mm=0.0)  # the margin is CropForegroundd's
        mask = np.zeros(image.shape, dtype=bool)
        mask[tuple(slice(a, b) for a, b in box)] = True
        return mask

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            mask = self.body(np.asarray(img[0].detach().cpu().numpy(), dtype=np.float32))
            d[self.mask_key] = MetaTensor(torch.from_numpy(mask[None]),
                                          meta=dict(img.meta) if isinstance(img, MetaTensor) else None)
        return d


class MRZScored(MapTransform):
    """MR intensities of ``(1, X, Y, Z)`` images, as prep does (``normalize_mr``).

    The image is clipped to the ``percentiles`` of its body voxels (``mask_key``, bool, same
    shape), then z-scored with their mean and std. Output float32.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "body",
                 percentiles: Sequence[float] = (0.5, 99.5), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.percentiles = mask_key, tuple(float(p) for p in percentiles)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from medseg_dpl.data.preprocess import normalize_mr

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = np.array(img[0].detach().cpu().numpy(), dtype=np.float32)  # a copy: normalised in place
            mask = np.asarray(d[self.mask_key][0].detach().cpu().numpy(), dtype=bool)
            normalize_mr(arr, mask, self.percentiles)
            d[key] = _like(arr[None], img)
        return d


class ResampleToSourced(MapTransform):
    """Class probabilities on the model grid -> uint8 labels on the input's own voxels.

    ``keys``: probabilities ``(C, x, y, z)`` on the grid of ``ref_key`` (the preprocessed image,
    whose affine is that grid's world affine). Output ``(1, X, Y, Z)`` uint8 with the shape
    (``spatial_shape``) and affine (``original_affine``) that the reader recorded, and the
    reader's other metadata (file name for ``SaveImaged``). Same rule as predict
    (``resample_probs_to_grid``): trilinear class maps, argmax, background outside the crop.
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from medseg_dpl.evaluation.predict import resample_probs_to_grid

        d = dict(data)
        ref = d[self.ref_key]
        shape = [int(s) for s in np.asarray(ref.meta["spatial_shape"]).ravel()[:3]]
        source_affine = np.asarray(ref.meta["original_affine"], dtype=np.float64)
        for key in self.key_iterator(d):
            probs = np.asarray(d[key].detach().cpu().float().numpy())
            labels = resample_probs_to_grid(probs, np.asarray(ref.affine, np.float64), shape, source_affine)
            meta = {k: v for k, v in ref.meta.items() if k != "affine"}
            d[key] = MetaTensor(torch.from_numpy(labels[None]), affine=torch.as_tensor(source_affine),
                                meta=meta)
        return d


class RemoveSmallComponentsd(MapTransform):
    """The ``remove_small`` rule of the run's post-processing decision, on ``(1, X, Y, Z)`` labels.

    ``rules``: ``[[label, min_fraction], ...]``. For each, the components of ``label`` smaller
    than ``min_fraction`` × its largest component become background (``remove_small``).
    """

    def __init__(self, keys: KeysCollection, rules: Sequence[Sequence[float]], connectivity: int = 3,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.rules = [(int(label), float(frac)) for label, frac in rules]
        self.connectivity = int(connectivity)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from medseg_dpl.evaluation.postprocess import remove_small

        d = dict(data)
        for key in self.key_iterator(d):
            labels = np.asarray(d[key][0].detach().cpu().numpy())
            for label, frac in self.rules:
                labels = remove_small(labels, label, frac, self.connectivity)
            d[key] = _like(labels[None], d[key])
        return d


class FlipTTAInferer(Inferer):
    """predict's sliding windows with the 8-flip TTA (``eval.tta``); returns softmax probabilities.

    ``inputs`` ``(N, 1, X, Y, Z)`` -> ``(N, C, X, Y, Z)`` float32, already softmax-ed (the
    average of the flipped softmaxes), so the bundle applies no ``Activationsd`` after it.
    """

    def __init__(self, roi_size: Sequence[int], sw_batch_size: int = 2, overlap: float = 0.5):
        super().__init__()
        self.roi_size, self.sw_batch_size, self.overlap = list(roi_size), int(sw_batch_size), float(overlap)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        from medseg_dpl.evaluation.inference import sliding_window_predict

        return sliding_window_predict(network, inputs, self.roi_size, overlap=self.overlap,
                                      sw_batch_size=self.sw_batch_size, tta_flip=True)


class DicomSeriesReader(ImageReader):
    """A DICOM series folder through SimpleITK, as predict reads it (``read_dicom_series``).

    Gives the ITK index order ``(i, j, k)`` and a RAS affine, with the metadata keys MONAI's
    NIfTI reader writes (``affine``, ``original_affine``, ``spatial_shape``, ``space``).
    """

    def verify_suffix(self, filename) -> bool:
        from medseg_dpl.data.io import dicom_series_ids

        names = ensure_tuple(filename)
        return len(names) == 1 and os.path.isdir(names[0]) and bool(dicom_series_ids(names[0]))

    def read(self, data, **kwargs):
        return [str(p) for p in ensure_tuple(data)]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        from medseg_dpl.data.io import read_dicom_series

        folders = ensure_tuple(img)
        if len(folders) != 1:
            raise ValueError(f"DicomSeriesReader reads one series folder at a time, got {len(folders)}")
        array, affine = read_dicom_series(folders[0])
        meta = {"affine": affine, "original_affine": affine.copy(), "spatial_shape": np.asarray(array.shape),
                "space": "RAS", "original_channel_dim": float("nan")}
        return array.astype(np.float32, copy=False), meta


def list_cases(dataset_dir: str | os.PathLike) -> list[dict]:
    """The bundle's data list: ``[{"image": path}, ...]`` under ``dataset_dir``, by predict's
    rules (every NIfTI file directly inside it, sorted; or the folder itself when it is a DICOM
    series; or one NIfTI file)."""
    from medseg_dpl.evaluation.predict import find_inputs

    return [{"image": str(path)} for _, path in find_inputs(dataset_dir)]
