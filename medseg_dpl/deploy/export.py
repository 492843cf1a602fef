"""``medseg-dpl export``: a training checkpoint -> a MONAI bundle that reproduces ``predict``.

Layout written (MONAI Bundle specification)::

    BUNDLE/configs/metadata.json    versions, network_data_format (inputs/outputs, channels,
                                    label numbering), spacing, intensity, provenance
    BUNDLE/configs/inference.json   the predict pipeline from MONAI components (+ the package's
                                    transforms in medseg_dpl.deploy.transforms, referenced by name)
    BUNDLE/models/model.pt          state dict of the inference network
    BUNDLE/models/model.ts          TorchScript of it, with metadata.json and inference.json inside
    BUNDLE/docs/README.md           data, labeled fraction, method, eval Dice, intended use
    BUNDLE/docs/license.txt         the model's licence and the training data's, where known

Everything is written into a temporary folder beside ``BUNDLE`` and moved into place at the
end, so a refused checkpoint or a failure leaves nothing behind.

Run the bundle::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --bundle_root BUNDLE --dataset_dir IN --output_dir OUT
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from medseg_dpl.errors import MedsegError

log = logging.getLogger(__name__)

BUNDLE_VERSION = "0.1.0"
# Written into metadata.json; verify_metadata downloads it to validate (not needed to run).
META_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
               "0.8.1/meta_schema_20240725.json")
# Training-data licences the package knows: dataset name (lower case, substring) -> licence.
KNOWN_DATA_LICENCES = {
    "chaos": ("CC BY-SA 4.0 (CHAOS challenge, MR T2-SPIR). Keep this attribution with any copy "
              "and cite: Kavur et al., \"CHAOS Challenge - combined (CT-MR) healthy abdominal organ "
              "segmentation\", Medical Image Analysis 69, 2021."),
}
META_REQUIRED = ("version", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright",
                 "network_data_format")
TENSOR_REQUIRED = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype",
                   "value_range", "is_patch_data", "channel_def")


class ExportError(MedsegError, RuntimeError):
    """A checkpoint that cannot be exported; the message names the file and the cause."""


# --------------------------------------------------------------------------- checkpoint
def read_checkpoint(path: str | os.PathLike, modality: str | None = None):
    """``(raw checkpoint dict, LoadedModel, intensity scheme)`` of a segmentation checkpoint.

    Reads it with the package's one reader (``medseg_dpl.checkpoint.load_checkpoint``) and builds
    the network with predict's own loader (``model_from_checkpoint``), so the bundle gets exactly
    the network, classes, spacing, patch, overlap and post-processing predict would use. Refuses,
    with :class:`ExportError` naming the file and the cause: a missing, corrupt or non-torch
    file, a checkpoint of the classification side (``medseg-dpl classify``), a newer format, and
    any other checkpoint predict rejects. ``modality``: for a model trained on CT and MR, the
    scheme to apply.
    """
    from medseg_dpl.checkpoint import CheckpointError, load_checkpoint
    from medseg_dpl.data.preprocess import intensity_kwargs
    from medseg_dpl.evaluation.predict import PredictError, model_from_checkpoint

    path = Path(path)
    try:
        ckpt = load_checkpoint(path, "segmentation")
        lm = model_from_checkpoint(path, ckpt, "cpu")
        scheme = intensity_kwargs(lm.intensity, modality)
    except (CheckpointError, PredictError) as exc:  # both name the file and the cause
        raise ExportError(str(exc)) from None
    except ValueError as exc:  # mixed CT/MR model without --modality, or a wrong one
        raise ExportError(f"{path}: {exc}") from None
    return ckpt, lm, scheme


# --------------------------------------------------------------------------- inference.json
def _margin_voxels(spacing) -> list[int]:
    """Prep's body-crop margin (``BODY_MARGIN_MM`` per side) in voxels of the target grid."""
    from medseg_dpl.data.preprocess import BODY_MARGIN_MM

    return [int(np.ceil(BODY_MARGIN_MM / float(s))) for s in spacing]


def preprocessing_transforms(spacing, scheme: dict) -> list[dict]:
    """predict's ``preprocess_image`` as bundle transforms on key ``image`` -> ``(1, x, y, z)``."""
    pkg = "medseg_dpl.deploy.transforms"
    modality = scheme["modality"]
    steps = [
        # NIfTI through nibabel (MONAI's reader), DICOM series folders through SimpleITK as predict
        {"_target_": "LoadImaged", "keys": "image", "image_only": True,
         "reader": [f"{pkg}.DicomSeriesReader", "NibabelReader"]},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS",
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},  # RAS+ as nibabel (predict)
        {"_target_": f"{pkg}.PrepSpacingd", "keys": "image", "pixdim": [float(s) for s in spacing]},
        {"_target_": f"{pkg}.BodyMaskd", "keys": "image", "modality": modality, "mask_key": "body"},
        {"_target_": "CropForegroundd", "keys": ["image", "body"], "source_key": "body",
         "margin": _margin_voxels(spacing), "allow_smaller": True},
    ]
    if modality == "ct":
        lo, hi = (float(c) for c in scheme["clip"])
        steps.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
                      "b_min": 0.0, "b_max": 1.0, "clip": True})
    else:
        steps.append({"_target_": f"{pkg}.MRZScored", "keys": "image", "mask_key": "body",
                      "percentiles": [float(p) for p in scheme["percentiles"]]})
    steps.append({"_target_": "DeleteItemsd", "keys": "body"})
    return steps


def inferer_config(lm, tta: bool) -> dict:
    """MONAI's Gaussian sliding windows with the run's patch and overlap (or predict's flip TTA)."""
    args = {"roi_size": list(lm.patch_size), "sw_batch_size": lm.sw_batch_size, "overlap": lm.overlap}
    if tta:
        return {"_target_": "medseg_dpl.deploy.transforms.FlipTTAInferer", **args}
    return {"_target_": "SlidingWindowInferer", **args, "mode": "gaussian"}


def postprocessing_transforms(decision: dict | None, tta: bool) -> list[dict]:
    """Softmax -> labels on the input's grid -> the run's per-organ rule -> NIfTI in ``output_dir``."""
    pkg = "medseg_dpl.deploy.transforms"
    steps = [] if tta else [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    steps.append({"_target_": f"{pkg}.ResampleToSourced", "keys": "pred", "ref_key": "image"})
    if decision:
        conn = int(decision.get("connectivity", 3))
        rules = sorted(decision["organs"].values(), key=lambda r: int(r["label"]))
        largest = [int(r["label"]) for r in rules if r["op"] == "keep_largest"]
        small = [[int(r["label"]), float(r["min_fraction"])] for r in rules if r["op"] == "remove_small"]
        if largest:
            steps.append({"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
                          "applied_labels": largest, "is_onehot": False, "independent": True,
                          "connectivity": conn})
        if small:
            steps.append({"_target_": f"{pkg}.RemoveSmallComponentsd", "keys": "pred",
                          "rules": small, "connectivity": conn})
    steps.append({"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                  "output_postfix": "", "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8",
                  "resample": False, "separate_folder": False, "print_log": False})
    return steps


def inference_config(lm, scheme: dict, tta: bool | None = None) -> dict:
    """The bundle's ``inference.json`` (a plain dict) for a loaded checkpoint.

    ``run`` needs no ignite: it maps each case of ``dataset`` through ``case_inference`` (the
    inferer on the preprocessed image) and ``postprocessing``, keeping nothing in memory.
    ``tta``: None -> the run's ``eval.tta``, as predict.
    """
    from medseg_dpl.models import network_spec

    if tta is None:
        tta = bool((lm.config.get("eval") or {}).get("tta", False))
    target, kwargs = network_spec(lm.config.get("model", {}), 1, len(lm.classes))
    return {
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": target, **kwargs},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_transforms(lm.spacing, scheme)},
        "datalist": {"_target_": "medseg_dpl.deploy.transforms.list_cases", "dataset_dir": "@dataset_dir"},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": inferer_config(lm, tta),
        # the inferer on one preprocessed image (1, x, y, z) -> "pred" (C, x, y, z); bf16
        # autocast on CUDA as predict (off on CPU)
        "case_inference": {
            "_target_": "Lambdad", "keys": "image", "overwrite": "pred",
            "func": "$torch.no_grad()(torch.autocast(@device.type, dtype=torch.bfloat16, "
                    "enabled=@device.type == 'cuda')(lambda x, net=@network, inferer=@inferer, "
                    "device=@device: inferer(x[None].to(device), net)[0].float().cpu()))"},
        "postprocessing": {"_target_": "Compose",
                           "transforms": postprocessing_transforms(lm.postprocessing, tta)},
        "initialize": [
            "$import collections",
            "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
            "map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
        "run": ["$collections.deque(map(@postprocessing, map(@case_inference, @dataset)), maxlen=0)"],
    }


# --------------------------------------------------------------------------- training record
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _count_lines(path: Path) -> int | None:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return None


def _raw_dataset_json(manifest: dict | None) -> dict | None:
    """The raw data set's own ``dataset.json`` (nnU-Net, AMOS), found from a prepped case's source."""
    for case in (manifest or {}).get("cases", [])[:1]:
        if not case.get("source_image"):
            continue
        src = Path(case["source_image"])
        for folder in (src.parent, src.parent.parent):  # imagesTr/x.nii.gz -> the raw folder
            info = _read_json(folder / "dataset.json")
            if info:
                return info
    return None


def training_record(checkpoint: Path, ckpt: dict, lm) -> dict:
    """What the bundle's README and metadata say about training: data set, labeled fraction,
    method, eval Dice per organ, data licence. Reads ``data.root``/dataset.json, its split lists
    and ``RUN/metrics.json`` when they are still there; the checkpoint's record otherwise."""
    cfg = lm.config
    dcfg = cfg.get("data", {}) or {}
    root = Path(dcfg["root"]) if dcfg.get("root") else None  # PREP_DIR, if the run recorded one
    manifest = _read_json(root / "dataset.json") if root else None
    raw = _raw_dataset_json(manifest)
    name = (raw or {}).get("name") or (manifest or {}).get("dataset") or "unknown"
    n_lab = _count_lines(root / "splits" / f"{dcfg.get('labeled_split', '')}.txt") if root else None
    n_unl = _count_lines(root / "splits" / f"{dcfg.get('unlabeled_split', '')}.txt") if root else None
    method = (cfg.get("method") or {}).get("name", "unknown")
    metrics = _read_json(checkpoint.parent.parent / "metrics.json") or {}
    step = ckpt.get("step")
    dice = next((h.get("dice") for h in metrics.get("val_history", []) if h.get("step") == step), None)
    licence = (raw or {}).get("licence") or (raw or {}).get("license")
    if not licence:
        licence = next((v for k, v in KNOWN_DATA_LICENCES.items() if k in str(name).lower()), None)
    return {
        "dataset": str(name), "data_root": str(root) if root else None,
        "num_cases": len(manifest["cases"]) if manifest else None,
        "labeled_split": dcfg.get("labeled_split"), "labeled": n_lab, "unlabeled": n_unl,
        "labeled_fraction": (n_lab / (n_lab + n_unl)) if n_lab is not None and n_unl is not None
        and n_lab + n_unl else None,
        "unlabeled_used": method != "supervised",  # a supervised run trains on the labeled split only
        "method": method, "step": step, "best_metric": ckpt.get("best_metric"),
        "eval_dice": dice, "eval_split": dcfg.get("eval_split"), "data_licence": licence,
    }


# --------------------------------------------------------------------------- metadata.json
def _versions() -> dict:
    """MONAI, PyTorch and NumPy versions, and the packages the bundle needs to run
    (``required_packages_version``: MONAI's current name for ``optional_packages_version``)."""
    import importlib.metadata as md

    import monai

    req = {}
    # medseg-dpl: the config's transforms; fire: the command line of `python -m monai.bundle run`
    for pkg in ("medseg-dpl", "nibabel", "scipy", "scikit-image", "SimpleITK", "fire"):
        try:
            req[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__, "required_packages_version": req}


def network_data_format(lm, scheme: dict) -> dict:
    """``network_data_format``: one image patch in, class logits out (label = argmax channel)."""
    ct = scheme["modality"] == "ct"
    patch = [int(p) for p in lm.patch_size]
    classes = {str(i): c for i, c in enumerate(lm.classes)}
    return {
        "inputs": {"image": {
            "type": "image", "format": "magnitude", "modality": "CT" if ct else "MR", "num_channels": 1,
            "spatial_shape": patch, "dtype": "float32", "value_range": [0, 1] if ct else [],
            "is_patch_data": True, "channel_def": {"0": "image"}}},
        "outputs": {"pred": {
            "type": "image", "format": "labels", "modality": "n/a", "num_channels": len(lm.classes),
            "spatial_shape": patch, "dtype": "float32", "value_range": [],
            "is_patch_data": True, "channel_def": classes}},
    }


def build_metadata(checkpoint: Path, ckpt: dict, lm, scheme: dict, record: dict, tta: bool) -> dict:
    """``metadata.json``: MONAI's required fields plus what predict records about the model."""
    from medseg_dpl import __version__

    ct = scheme["modality"] == "ct"
    organs = ", ".join(lm.classes[1:])
    norm = (f"CT: HU clipped to {list(scheme['clip'])} and scaled to [0, 1]" if ct else
            f"MR: clipped to the body voxels' percentiles {list(scheme['percentiles'])}, then z-scored")
    dice = record["eval_dice"] or {}
    mean = [v for v in dice.values() if v is not None and np.isfinite(v)]
    return {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by medseg-dpl {__version__} from {checkpoint.name} "
                                      f"(step {ckpt.get('step')})"},
        **_versions(),
        "name": f"medseg-dpl {record['dataset']} {'CT' if ct else 'MR'} organ segmentation",
        "task": f"3D {'CT' if ct else 'MR'} abdominal organ segmentation ({organs})",
        "description": (f"A {lm.config.get('model', {}).get('name', 'UNet')} trained with medseg-dpl "
                        f"(method {record['method']}) on {record['dataset']}. Input: a 3D volume "
                        "(NIfTI file or DICOM series); output: a uint8 label map on the input's grid."),
        "authors": "medseg-dpl",
        "copyright": "Copyright (c) the medseg-dpl authors",
        "intended_use": "Research only. Not a medical device; not for clinical use or diagnosis.",
        "data_source": record["dataset"] + (f" (prepped at {record['data_root']})" if record["data_root"] else ""),
        "data_type": "nifti",
        "data_licence": record["data_licence"] or "not known",
        "image_classes": f"single channel, RAS, resampled to {lm.spacing} mm, body crop; {norm}",
        "label_classes": ", ".join(f"{i} {c}" for i, c in enumerate(lm.classes)),
        "pred_classes": f"{len(lm.classes)} channels of logits; the label is the channel of the largest value",
        "eval_metrics": {"mean_dice": float(np.mean(mean)) if mean else record["best_metric"]},
        "references": ["MONAI bundle specification: https://docs.monai.io/en/latest/mb_specification.html"],
        "network_data_format": network_data_format(lm, scheme),
        "labels": {c: i for i, c in enumerate(lm.classes)},
        "medseg_dpl": {
            "checkpoint": str(checkpoint.resolve()), "step": ckpt.get("step"),
            "spacing": lm.spacing, "orientation": "RAS", "intensity": lm.intensity,
            "modality": scheme["modality"], "patch_size": lm.patch_size, "overlap": lm.overlap,
            "sw_batch_size": lm.sw_batch_size, "tta": bool(tta), "postprocessing": lm.postprocessing,
            "training": record,
        },
    }


def check_metadata(meta: dict) -> list[str]:
    """The required fields of MONAI's metadata schema that ``meta`` lacks (empty: complete).

    Offline stand-in for ``monai.bundle.verify_metadata``, which downloads the schema."""
    missing = [k for k in META_REQUIRED if k not in meta]
    fmt = meta.get("network_data_format", {})
    for side in ("inputs", "outputs"):
        tensors = fmt.get(side) or {}
        if not tensors:
            missing.append(f"network_data_format.{side}")
        for name, spec in tensors.items():
            missing += [f"network_data_format.{side}.{name}.{k}" for k in TENSOR_REQUIRED if k not in spec]
    return missing


# --------------------------------------------------------------------------- docs
def _pct(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def _rule(rule: dict) -> str:
    """A post-processing rule in words: ``keep_largest``, ``remove_small < 0.1 x largest``, ``none``."""
    if rule["op"] == "remove_small":
        return f"remove_small < {rule['min_fraction']:g} x largest"
    return rule["op"]


def _labeled_line(record: dict) -> str:
    """README line: the labeled fraction of the training cases, with the counts where known."""
    frac, split = record["labeled_fraction"], record["labeled_split"]
    line = f"- labeled fraction: {'unknown' if frac is None else f'{100 * frac:.0f} %'}"
    if record["labeled"] is None:
        return line + (f" (split `{split}`)" if split else "")
    unused = "" if record["unlabeled_used"] else ", not used by a supervised run"
    return (line + f" of the training cases ({record['labeled']} labeled, {record['unlabeled']} "
            f"unlabeled{unused}; split `{split}`)")


def readme_text(meta: dict, record: dict) -> str:
    """``docs/README.md``: what the model is, what it was trained on, how well, how to run it."""
    info = meta["medseg_dpl"]
    lines = [
        f"# {meta['name']}", "", meta["description"], "",
        "**Intended use: research only, not for clinical use. This model is not a medical device "
        "and must not be used for diagnosis or treatment decisions.**", "",
        "## Training", "",
        f"- data: {record['dataset']}" + (f", {record['num_cases']} prepped cases" if record["num_cases"] else ""),
        _labeled_line(record),
        f"- method: {record['method']}; checkpoint step {record['step']}",
        f"- network: {meta['network_data_format']['inputs']['image']['spatial_shape']} patches, "
        f"spacing {info['spacing']} mm (RAS), {meta['image_classes']}",
        f"- data licence: {meta['data_licence']}", "",
        "## Eval Dice per organ", "",
    ]
    dice = record["eval_dice"]
    if dice:
        lines += [f"On the run's eval split (`{record['eval_split']}`, validation at the checkpoint's step):", "",
                  "| organ | Dice % |", "| --- | --- |"] + [f"| {k} | {_pct(v)} |" for k, v in dice.items()]
    else:
        lines.append(f"No per-organ record found (RUN/metrics.json); best mean Dice in the checkpoint: "
                     f"{_pct(record['best_metric'])} %.")
    pp = info["postprocessing"]
    if pp:
        lines += ["", "Post-processing (decided on the eval split, applied by the bundle):", "",
                  "| organ | rule | Dice raw % | Dice after % |", "| --- | --- | --- | --- |"]
        lines += [f"| {o} | {_rule(r)} | {_pct(r.get('dice_raw'))} | {_pct(r.get('dice'))} |"
                  for o, r in pp["organs"].items()]
    lines += [
        "", "## Labels", "", "| value | class |", "| --- | --- |",
        *[f"| {v} | {c} |" for c, v in meta["labels"].items()],
        "", "## Run", "",
        "Needs `medseg-dpl` installed (the config names its transforms in "
        "`medseg_dpl.deploy.transforms`) and `fire` for the command line:", "",
        "```bash",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\",
        "    --bundle_root BUNDLE --dataset_dir IN --output_dir OUT",
        "```", "",
        "Every NIfTI file directly in `IN` (or `IN` itself if it is a DICOM series folder) gives "
        "`OUT/<name>.nii.gz`: a uint8 label map with the input's shape and affine, the same "
        "labels as `medseg-dpl predict` (same preprocessing, sliding windows "
        f"{info['patch_size']} with overlap {info['overlap']}, post-processing).", "",
        "In MONAI Label: put the bundle folder in the app's model folder and start the "
        "`monaibundle` app with `--conf models <bundle folder name>`; it uses `network_def`, "
        "`preprocessing`, `inferer` and `postprocessing` of `inference.json` and `models/model.pt`.",
    ]
    return "\n".join(lines) + "\n"


def licence_text(record: dict) -> str:
    """``docs/license.txt``: the model's terms and the training data's licence where known."""
    data = record["data_licence"] or (
        "not known to medseg-dpl. Check the data set's own terms before sharing this model "
        "(e.g. AMOS22: amos22.grand-challenge.org; Synapse/BTCV: synapse.org). A model trained "
        "on the project's synthetic phantom (medseg-dpl phantom) carries no third-party data licence.")
    return ("Model weights and configuration: exported by medseg-dpl (MIT licence). Research use "
            "only; not for clinical use.\n\n"
            f"Training data ({record['dataset']}): {data}\n")


# --------------------------------------------------------------------------- writing
def _torchscript(net: torch.nn.Module, patch) -> torch.jit.ScriptModule:
    """Script the network; trace it on a patch where scripting fails."""
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; MONAI bundles still ship it
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.script(net)
        except Exception as exc:  # a network that TorchScript cannot compile
            log.warning("torch.jit.script failed (%s); tracing on a %s patch instead", exc, list(patch))
            return torch.jit.trace(net, torch.zeros(1, 1, *patch))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_bundle(folder: Path, checkpoint: Path, ckpt: dict, lm, scheme: dict, tta: bool | None,
                 data_licence: str | None = None) -> dict:
    """Write every bundle file into ``folder``; returns the metadata."""
    from monai.data import save_net_with_metadata

    record = training_record(checkpoint, ckpt, lm)
    if data_licence:
        record["data_licence"] = data_licence
    config = inference_config(lm, scheme, tta)
    use_tta = config["inferer"]["_target_"].endswith("FlipTTAInferer")
    meta = build_metadata(checkpoint, ckpt, lm, scheme, record, use_tta)
    _write_json(folder / "configs" / "metadata.json", meta)
    _write_json(folder / "configs" / "inference.json", config)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    net = lm.model.cpu().eval()
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.save, as above
        save_net_with_metadata(_torchscript(net, lm.patch_size), str(folder / "models" / "model"),
                               include_config_vals=False, meta_values=meta,
                               more_extra_files={"inference.json": json.dumps(config).encode()})
    (folder / "docs").mkdir(parents=True, exist_ok=True)
    (folder / "docs" / "README.md").write_text(readme_text(meta, record), encoding="utf-8")
    (folder / "docs" / "license.txt").write_text(licence_text(record), encoding="utf-8")
    return meta


def export_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike, modality: str | None = None,
                  tta: bool | None = None, data_licence: str | None = None, overwrite: bool = False) -> Path:
    """Export ``checkpoint`` (``RUN/checkpoints/best.pt``) as a MONAI bundle folder ``out``.

    ``modality``: "ct" | "mr", only for a model trained on both; ``tta``: None -> the run's
    ``eval.tta``; ``data_licence``: text that overrides the training data's licence found.
    ``out`` must not exist unless ``overwrite``. Raises :class:`ExportError` (nothing written).
    Returns ``out``.
    """
    t0 = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists (give --overwrite to replace it)")
    ckpt, lm, scheme = read_checkpoint(checkpoint, modality)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_bundle(tmp, checkpoint, ckpt, lm, scheme, tta, data_licence)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s in %.1f s", checkpoint, out, time.perf_counter() - t0)
    return out
