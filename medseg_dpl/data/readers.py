"""Readers of raw dataset layouts: each turns a folder into case records.

Supported layouts (``dataset`` argument):

* ``"synapse"`` (BTCV): ``RawData/Training/img/img0001.nii.gz`` + ``RawData/Training/label/
  label0001.nii.gz`` (``--raw`` may also point at ``RawData/Training`` or at a folder holding
  ``img/`` and ``label/``), or the ``imagesTr/img0001.nii.gz`` + ``labelsTr/label0001.nii.gz``
  variant. Case id ``0001``. Every case must have a label. ``RawData/Testing`` (no labels) is
  not used, as in the published semi-supervised protocol.
* ``"amos"`` (AMOS22): ``dataset.json`` (optional), ``imagesTr/amos_0001.nii.gz`` +
  ``labelsTr/``, ``imagesVa/`` + ``labelsVa/`` (the test set of the DHC protocol, so labels are
  required). Case id ``amos_0001``. Ids >= 500 are MRI (modality ``"mr"``), the rest CT;
  ``ct_only`` drops the MRI scans.
* ``"nnunet"`` (nnU-Net v2 raw): ``dataset.json`` (``channel_names``, ``labels``,
  ``numTraining``, ``file_ending``), ``imagesTr/<case>_0000<ending>`` + ``labelsTr/<case><ending>``,
  and ``imagesTs/`` when present (unlabeled cases; the test set when ``labelsTs/`` exists). One
  channel only; its name gives the modality (``"CT"`` -> ct, anything else -> mr, as nnU-Net's
  normalisation choice). Case id ``<case>``. Only NIfTI endings (``.nii.gz``, ``.nii``).
* ``"nifti"``: one NIfTI file or a folder of them; ``labels`` optionally a label file or a
  folder of label files with the image's file name. Case id = file name without extension.
* ``"dicom"``: one DICOM series folder, or a folder of series folders (case id = folder name);
  ``labels`` optionally a folder of ``<case id>.nii.gz`` label files.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medseg_dpl.data.io import dicom_series_ids, is_nifti, list_nifti, nifti_stem

DATASETS = ("synapse", "amos", "nnunet", "nifti", "dicom")
MODALITIES = ("ct", "mr")
AMOS_FIRST_MRI_ID = 500


@dataclass(frozen=True)
class Case:
    """One raw case: ``image`` is a NIfTI file or a DICOM series folder."""

    id: str
    image: Path
    label: Path | None
    subset: str = "train"          # "train" or "test" (AMOS imagesVa)
    label_required: bool = False   # the layout promises a label for this case
    modality: str | None = None    # "ct" | "mr" when the layout says; None: prep's default (ct)

    def as_dict(self) -> dict:
        return {"id": self.id, "image": str(self.image),
                "label": None if self.label is None else str(self.label), "subset": self.subset}


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- Synapse
_SYN_IMG = re.compile(r"^img(\d+)$")
_SYN_LAB = re.compile(r"^label(\d+)$")


def _synapse_dirs(raw: Path) -> tuple[Path, Path] | None:
    for img_dir, lab_dir in (
        (raw / "RawData" / "Training" / "img", raw / "RawData" / "Training" / "label"),
        (raw / "Training" / "img", raw / "Training" / "label"),
        (raw / "img", raw / "label"),
        (raw / "imagesTr", raw / "labelsTr"),
    ):
        if img_dir.is_dir():
            return img_dir, lab_dir
    return None


def scan_synapse(raw: Path) -> tuple[list[Case], list[str]]:
    dirs = _synapse_dirs(raw)
    if dirs is None:
        return [], [f"{raw}: not a Synapse/BTCV folder (expected RawData/Training/img/ + "
                    "RawData/Training/label/, or imagesTr/ + labelsTr/)"]
    img_dir, lab_dir = dirs
    cases, problems = [], []
    labels = {}
    if lab_dir.is_dir():
        for p in list_nifti(lab_dir):
            m = _SYN_LAB.match(nifti_stem(p))
            if m:
                labels.setdefault(m.group(1), []).append(p)
            else:
                problems.append(f"{p}: label file name does not match label<NNNN>.nii.gz")
    else:
        problems.append(f"{lab_dir}: label folder missing (every Synapse training case has a label)")
    seen = set()
    for p in list_nifti(img_dir):
        m = _SYN_IMG.match(nifti_stem(p))
        if not m:
            problems.append(f"{p}: image file name does not match img<NNNN>.nii.gz")
            continue
        cid = m.group(1)
        seen.add(cid)
        labs = labels.get(cid, [])
        if len(labs) > 1:
            problems.append(f"{lab_dir}: case {cid} has {len(labs)} label files "
                            f"({', '.join(x.name for x in labs)})")
        if not labs and lab_dir.is_dir():
            problems.append(f"{p}: missing label for case {cid} "
                            f"(expected {lab_dir / f'label{cid}.nii.gz'})")
        cases.append(Case(cid, p, labs[0] if labs else None, "train", label_required=True))
    for cid, labs in labels.items():
        if cid not in seen:
            problems.append(f"{labs[0]}: label without an image (expected {img_dir / f'img{cid}.nii.gz'})")
    if not cases and not problems:
        problems.append(f"{img_dir}: no img<NNNN>.nii.gz images found")
    return cases, problems


# ----------------------------------------------------------------------------- AMOS
def amos_number(case_id: str) -> int | None:
    m = re.match(r"^amos_(\d+)$", case_id)
    return int(m.group(1)) if m else None


def scan_amos(raw: Path, ct_only: bool = False) -> tuple[list[Case], list[str]]:
    from medseg_dpl.data.labels import AMOS_CLASSES

    problems: list[str] = []
    if not (raw / "imagesTr").is_dir() and not (raw / "imagesVa").is_dir():
        return [], [f"{raw}: not an AMOS22 folder (expected imagesTr/ and labelsTr/, "
                    "imagesVa/ and labelsVa/, dataset.json)"]
    listed: set[Path] = set()
    meta = raw / "dataset.json"
    if meta.exists():
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{meta}: unreadable dataset.json ({exc})")
            info = {}
        labels = info.get("labels")
        if isinstance(labels, dict) and len(labels) != len(AMOS_CLASSES):
            problems.append(f"{meta}: lists {len(labels)} labels, AMOS22 has {len(AMOS_CLASSES)} "
                            "(background + 15 organs)")
        for key in ("training", "validation"):
            for entry in info.get(key, []) or []:
                if not isinstance(entry, dict):
                    continue
                for field in ("image", "label"):
                    if entry.get(field):
                        p = (raw / entry[field]).resolve() if not os.path.isabs(entry[field]) \
                            else Path(entry[field])
                        listed.add(p)
                        cid = nifti_stem(p)
                        n = amos_number(cid)
                        if not p.exists() and not (ct_only and n is not None and n >= AMOS_FIRST_MRI_ID):
                            problems.append(f"{meta}: lists {entry[field]} ({key} {field}), "
                                            "which does not exist")
    cases: list[Case] = []
    for tag, subset in (("Tr", "train"), ("Va", "test")):
        img_dir, lab_dir = raw / f"images{tag}", raw / f"labels{tag}"
        if not img_dir.is_dir():
            continue
        lab_files = {nifti_stem(p): p for p in list_nifti(lab_dir)} if lab_dir.is_dir() else {}
        img_ids = set()
        for p in list_nifti(img_dir):
            cid = nifti_stem(p)
            n = amos_number(cid)
            if n is None:
                problems.append(f"{p}: image file name does not match amos_<NNNN>.nii.gz")
                continue
            if ct_only and n >= AMOS_FIRST_MRI_ID:
                continue
            img_ids.add(cid)
            lab = lab_files.get(cid)
            if lab is None:
                why = "" if tag == "Tr" else " (imagesVa is the test set and needs labelsVa/)"
                problems.append(f"{p}: missing label for case {cid} "
                                f"(expected {lab_dir / (cid + '.nii.gz')}){why}")
            cases.append(Case(cid, p, lab, subset, label_required=True,
                              modality="mr" if n >= AMOS_FIRST_MRI_ID else "ct"))
        for cid, lab in lab_files.items():
            n = amos_number(cid)
            if cid not in img_ids and not (ct_only and n is not None and n >= AMOS_FIRST_MRI_ID):
                problems.append(f"{lab}: label without an image in {img_dir}")
    if not cases and not problems:
        problems.append(f"{raw}: no amos_<NNNN>.nii.gz images in imagesTr/ or imagesVa/")
    return cases, problems


# ----------------------------------------------------------------------------- nnU-Net v2
NNUNET_ENDINGS = (".nii.gz", ".nii")
_NNUNET_IMAGE = re.compile(r"^(.+)_(\d{4})$")


def channel_modality(name: str) -> str:
    """nnU-Net's rule: a channel named "CT" gets the CT scheme, any other name per-case z-score."""
    return "ct" if str(name).strip().lower() == "ct" else "mr"


def _nnunet_labels(labels, meta: Path) -> tuple[list[str] | None, list[str]]:
    """``{"background": 0, "liver": 1, ...}`` -> class names ordered by value (0..K, consecutive)."""
    if not isinstance(labels, dict) or not labels:
        return None, [f"{meta}: 'labels' must be a non-empty mapping of class name -> label value"]
    regions = [k for k, v in labels.items() if isinstance(v, (list, tuple))]
    if regions:
        return None, [f"{meta}: region labels ({', '.join(regions)}) are not supported; give one "
                      "integer per class"]
    bad = [k for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        return None, [f"{meta}: label value of {', '.join(bad)} is not an integer"]
    by_value = sorted(labels.items(), key=lambda kv: kv[1])
    values = [v for _, v in by_value]
    if values != list(range(len(values))):
        return None, [f"{meta}: label values must be 0..K without gaps or repeats (background 0), "
                      f"got {values}"]
    return [k for k, _ in by_value], []


def read_nnunet_json(raw: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """Validated ``dataset.json`` of an nnU-Net v2 raw folder, and its problems.

    Returns ``{"classes": [names by label value], "channel": str, "modality": "ct"|"mr",
    "ending": str, "num_training": int | None, "path": Path}`` or None (with problems) when it
    cannot be used.
    """
    meta = Path(raw) / "dataset.json"
    if not meta.is_file():
        return None, [f"{meta}: not found (an nnU-Net v2 raw dataset has dataset.json next to "
                      "imagesTr/ and labelsTr/)"]
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, [f"{meta}: unreadable dataset.json ({exc})"]
    if not isinstance(info, dict):
        return None, [f"{meta}: not a JSON object"]
    problems: list[str] = []
    channels = info.get("channel_names")
    channel = None
    if not isinstance(channels, dict) or not channels:
        problems.append(f"{meta}: 'channel_names' missing or empty (e.g. {{\"0\": \"MRI\"}})")
    elif len(channels) > 1:
        problems.append(f"{meta}: {len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
                        "more than one channel is not supported yet")
    elif "0" not in channels:
        problems.append(f"{meta}: channel_names has no channel \"0\" ({channels})")
    else:
        channel = str(channels["0"])
    classes, label_problems = _nnunet_labels(info.get("labels"), meta)
    problems += label_problems
    ending = info.get("file_ending")
    if not isinstance(ending, str) or not ending:
        problems.append(f"{meta}: 'file_ending' missing (e.g. \".nii.gz\")")
        ending = None
    elif ending not in NNUNET_ENDINGS:
        problems.append(f"{meta}: file_ending {ending!r} is not supported (NIfTI only: "
                        f"{', '.join(NNUNET_ENDINGS)})")
        ending = None
    n_train = info.get("numTraining")
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, int)):
        problems.append(f"{meta}: numTraining {n_train!r} is not an integer")
        n_train = None
    if problems:
        return None, problems
    return {"classes": classes, "channel": channel, "modality": channel_modality(channel),
            "ending": ending, "num_training": n_train, "path": meta}, []


def _nnunet_files(folder: Path, ending: str, meta: Path, problems: list[str]) -> list[Path]:
    """Visible files of ``folder`` that end with ``ending``; every other file is a problem."""
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith((".", "._")):
            continue
        if p.name.endswith(ending):
            out.append(p)
        else:
            problems.append(f"{p}: does not end with the file_ending {ending!r} of {meta}")
    return out


def _nnunet_images(folder: Path, ending: str, meta: Path, problems: list[str]) -> dict[str, dict[int, Path]]:
    """``{case: {channel: file}}`` of ``imagesTr|imagesTs``; channels other than 0 are problems."""
    images: dict[str, dict[int, Path]] = {}
    for p in _nnunet_files(folder, ending, meta, problems):
        m = _NNUNET_IMAGE.match(p.name[: -len(ending)])
        if not m:
            problems.append(f"{p}: image name does not match <case>_<XXXX>{ending} (XXXX: channel, 0000)")
            continue
        ch = int(m.group(2))
        if ch != 0:
            problems.append(f"{p}: channel {m.group(2)} is not declared in channel_names of {meta} "
                            "(more than one channel is not supported yet)")
        images.setdefault(m.group(1), {})[ch] = p
    return images


def scan_nnunet(raw: Path) -> tuple[list[Case], list[str]]:
    if not (raw / "imagesTr").is_dir():
        return [], [f"{raw}: not an nnU-Net v2 raw folder (expected dataset.json, imagesTr/, labelsTr/)"]
    info, problems = read_nnunet_json(raw)
    if info is None:
        return [], problems
    ending, meta = info["ending"], info["path"]
    cases: list[Case] = []
    for tag in ("Tr", "Ts"):
        img_dir, lab_dir = raw / f"images{tag}", raw / f"labels{tag}"
        if not img_dir.is_dir():
            continue
        labeled = tag == "Tr" or lab_dir.is_dir()   # imagesTs without labelsTs: unlabeled cases
        subset = "test" if tag == "Ts" and labeled else "train"
        images = _nnunet_images(img_dir, ending, meta, problems)
        labels: dict[str, Path] = {}
        if lab_dir.is_dir():
            labels = {p.name[: -len(ending)]: p for p in _nnunet_files(lab_dir, ending, meta, problems)}
        elif tag == "Tr":
            problems.append(f"{lab_dir}: label folder missing (every training case has a label)")
        if tag == "Tr" and info["num_training"] is not None and lab_dir.is_dir() \
                and info["num_training"] != len(labels):
            problems.append(f"{meta}: numTraining is {info['num_training']} but {lab_dir} holds "
                            f"{len(labels)} label file(s)")
        for cid, lab in labels.items():
            if cid not in images:
                problems.append(f"{lab}: label without an image (expected {img_dir / (cid + '_0000' + ending)})")
        for cid, chans in sorted(images.items()):
            if 0 not in chans:
                others = ", ".join(p.name for p in chans.values())
                problems.append(f"{img_dir / (cid + '_0000' + ending)}: missing channel file _0000 of "
                                f"case {cid} (found {others})")
                continue
            lab = labels.get(cid)
            if lab is None and labeled and lab_dir.is_dir():
                problems.append(f"{chans[0]}: image without a label (expected {lab_dir / (cid + ending)})")
            cases.append(Case(cid, chans[0], lab, subset, label_required=labeled,
                              modality=info["modality"]))
    if not cases and not problems:
        problems.append(f"{raw / 'imagesTr'}: no <case>_0000{ending} images found")
    return cases, problems


def dataset_classes(dataset: str, raw: str | os.PathLike) -> list[str] | None:
    """Class names fixed by the layout (Synapse, AMOS, nnU-Net's dataset.json); None otherwise."""
    from medseg_dpl.data.labels import DATASET_CLASSES

    if dataset in DATASET_CLASSES:
        return list(DATASET_CLASSES[dataset])
    if dataset == "nnunet":
        info, _ = read_nnunet_json(raw)
        return None if info is None else list(info["classes"])
    return None


# ----------------------------------------------------------------------------- generic NIfTI
def scan_nifti(raw: Path, labels: Path | None = None) -> tuple[list[Case], list[str]]:
    problems: list[str] = []
    if raw.is_file():
        if not is_nifti(raw):
            return [], [f"{raw}: not a NIfTI file (.nii or .nii.gz)"]
        images = [raw]
    elif raw.is_dir():
        images = list_nifti(raw)
        if not images:
            return [], [f"{raw}: no NIfTI files (.nii, .nii.gz) in this folder"]
    else:
        return [], [f"{raw}: file or folder not found"]
    lab_files: dict[str, Path] = {}
    if labels is not None:
        if labels.is_file():
            if len(images) != 1:
                problems.append(f"{labels}: one label file given for {len(images)} images; "
                                "give a labels folder instead")
            else:
                lab_files[nifti_stem(images[0])] = labels
        elif labels.is_dir():
            lab_files = {nifti_stem(p): p for p in list_nifti(labels)}
        else:
            problems.append(f"{labels}: labels file or folder not found")
    cases = []
    for p in images:
        cid = nifti_stem(p)
        cases.append(Case(cid, p, lab_files.get(cid), "train", label_required=False))
    ids = {c.id for c in cases}
    for cid, lab in lab_files.items():
        if cid not in ids:
            problems.append(f"{lab}: label without an image named {cid}.nii[.gz] in {raw}")
    return cases, problems


# ----------------------------------------------------------------------------- DICOM
def scan_dicom(raw: Path, labels: Path | None = None) -> tuple[list[Case], list[str]]:
    if not raw.is_dir():
        return [], [f"{raw}: not a folder (give a DICOM series folder or a folder of them)"]
    problems: list[str] = []
    folders: list[Path] = []
    uids = dicom_series_ids(raw)
    if len(uids) > 1:
        return [], [f"{raw}: folder holds {len(uids)} DICOM series ({', '.join(uids)}); "
                    "put each series in its own folder"]
    if uids:
        folders = [raw]
    else:
        for sub in sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")):
            n = len(dicom_series_ids(sub))
            if n == 0:
                problems.append(f"{sub}: no DICOM series found in this folder")
            elif n > 1:
                problems.append(f"{sub}: folder holds {n} DICOM series "
                                f"({', '.join(dicom_series_ids(sub))}); put each series in its own folder")
            else:
                folders.append(sub)
        if not folders and not problems:
            problems.append(f"{raw}: no DICOM series here or in its sub-folders")
    lab_files: dict[str, Path] = {}
    if labels is not None:
        if labels.is_file() and len(folders) == 1:
            lab_files[folders[0].name] = labels
        elif labels.is_dir():
            lab_files = {nifti_stem(p): p for p in list_nifti(labels)}
        else:
            problems.append(f"{labels}: labels folder (of <case id>.nii.gz files) not found")
    cases = [Case(f.name, f, lab_files.get(f.name), "train", label_required=False) for f in folders]
    ids = {c.id for c in cases}
    for cid, lab in lab_files.items():
        if cid not in ids:
            problems.append(f"{lab}: label without a DICOM series folder named {cid}")
    return cases, problems


def scan_dataset(dataset: str, raw: str | os.PathLike, labels: str | os.PathLike | None = None,
                 ct_only: bool = False) -> tuple[list[Case], list[str]]:
    """Case records of a raw dataset, and the layout problems found (missing labels, bad names).

    Does not open any image; :func:`medseg_dpl.data.check.check_dataset` does.
    """
    raw = Path(raw)
    labels = None if labels is None else Path(labels)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if not raw.exists():
        return [], [f"{raw}: raw data folder not found"]
    if labels is not None and dataset in ("synapse", "amos", "nnunet"):
        return [], [f"--labels is only for the nifti and dicom datasets; {dataset} labels are "
                    "part of its layout"]
    if ct_only and dataset != "amos":
        return [], [f"--ct-only applies to AMOS (ids >= {AMOS_FIRST_MRI_ID} are MRI), not {dataset}"]
    if dataset == "synapse":
        return scan_synapse(raw)
    if dataset == "amos":
        return scan_amos(raw, ct_only)
    if dataset == "nnunet":
        return scan_nnunet(raw)
    if dataset == "nifti":
        return scan_nifti(raw, labels)
    return scan_dicom(raw, labels)
