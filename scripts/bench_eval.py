#!/usr/bin/env python
"""Benchmark: per-organ Dice + HD95 on a 512 x 512 x 150 volume with 13 organs, ours vs medpy.

medpy (``pip install medpy``, the bench-only extra ``medseg-dpl[bench]``) is what the DHC code
scores with: ``metric.binary.dc`` and ``metric.binary.hd95`` per organ on the full volume.
Ours: :func:`medseg_dpl.evaluation.metrics.organ_metrics` (MONAI on per-organ bounding-box
crops; it also returns ASD). Ground truth: a phantom case's labels (13 Synapse organs,
128 x 128 x 75) upsampled x4 in-plane and x2 along Z (nearest); prediction: the same labels
perturbed at low resolution (a 1-voxel shift, per-organ dilation/erosion, spurious blobs)
and upsampled the same way. Also times MONAI sliding-window inference of a small UNet on
the CPU at two overlaps.

    python scripts/bench_eval.py            # full size (needs medpy; a few minutes on 2 cores)
    python scripts/bench_eval.py --quick    # 256 x 256 x 75, for a smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy import ndimage


def make_volumes(quick: bool, seed: int = 0):
    from medseg_dpl.data.phantom import phantom_case

    case = phantom_case(seed, 0, layout="synapse", shape=(128, 128, 75))
    truth_lo = case.label
    rng = np.random.default_rng(seed)
    pred_lo = np.roll(truth_lo, 1, axis=0)
    for c in range(1, 14):
        m = pred_lo == c
        if m.sum() > 500 and rng.random() < 0.5:
            er = ndimage.binary_erosion(m)
            pred_lo[m & ~er] = 0
        else:
            grow = ndimage.binary_dilation(m) & (pred_lo == 0)
            pred_lo[grow] = c
    for _ in range(40):  # spurious blobs of random organs
        c = int(rng.integers(1, 14))
        x, y, z = (int(rng.integers(2, s - 4)) for s in truth_lo.shape)
        pred_lo[x:x + 2, y:y + 2, z:z + 2] = c
    fx, fz = (2, 1) if quick else (4, 2)
    up = lambda a: np.repeat(np.repeat(np.repeat(a, fx, 0), fx, 1), fz, 2)  # noqa: E731 nearest x4/x2
    sp = np.linalg.norm(case.affine[:3, :3], axis=0) / np.array([fx, fx, fz])
    truth, pred = up(truth_lo), up(pred_lo)
    assert all((truth == c).any() and (pred == c).any() for c in range(1, 14))
    return pred, truth, tuple(float(s) for s in sp)


def bench_metrics(pred, truth, spacing):
    from medpy.metric import binary

    from medseg_dpl.evaluation.metrics import organ_metrics

    t = time.perf_counter()
    ours = organ_metrics(pred, truth, 14, spacing=spacing)  # Dice + HD95 (+ ASD)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ours_dhc = organ_metrics(pred, truth, 14, protocol="dhc")  # medpy's HD95 definition, voxels
    t_ours_dhc = time.perf_counter() - t

    med_dice, med_hd, med_hd_vox = [], [], []
    t_med = 0.0
    t_med_vox = 0.0
    for c in range(1, 14):
        p, g = pred == c, truth == c
        t = time.perf_counter()
        med_dice.append(binary.dc(p, g))
        med_hd.append(binary.hd95(p, g, voxelspacing=spacing))
        t_med += time.perf_counter() - t
        t = time.perf_counter()
        med_hd_vox.append(binary.hd95(p, g))
        t_med_vox += time.perf_counter() - t
    med_dice, med_hd, med_hd_vox = map(np.asarray, (med_dice, med_hd, med_hd_vox))
    return {
        "t_ours_s": t_ours, "t_ours_dhc_s": t_ours_dhc, "t_medpy_s": t_med, "t_medpy_vox_s": t_med_vox,
        "speedup": t_med / t_ours, "speedup_dhc": t_med_vox / t_ours_dhc,
        "dice_max_abs_diff": float(np.max(np.abs(ours["dice"] - med_dice))),
        "hd95_dhc_vs_medpy_max_abs_diff_vox": float(np.max(np.abs(ours_dhc["hd95"] - med_hd_vox))),
        "hd95_monai_vs_medpy_max_abs_diff_mm": float(np.max(np.abs(ours["hd95"] - med_hd))),
        "hd95_monai_vs_medpy_max_rel_diff": float(np.max(np.abs(ours["hd95"] - med_hd) / np.maximum(med_hd, 1e-9))),
        "hd95_monai_vs_medpy_median_rel_diff": float(np.median(np.abs(ours["hd95"] - med_hd) / np.maximum(med_hd, 1e-9))),
        "per_organ": {"dice_ours": ours["dice"].tolist(), "dice_medpy": med_dice.tolist(),
                      "hd95_ours_mm": ours["hd95"].tolist(), "hd95_medpy_mm": med_hd.tolist()},
    }


def bench_inference(shape=(160, 160, 96), patch=(96, 96, 96), overlaps=(0.25, 0.5), repeats=1):
    from medseg_dpl.evaluation.inference import sliding_window_predict
    from medseg_dpl.models import build_model

    torch.manual_seed(0)
    net = build_model({"name": "UNet", "channels": [16, 32, 64, 128], "strides": [2, 2, 2]}, 1, 14).eval()
    x = torch.rand(1, 1, *shape)
    with torch.no_grad():
        net(torch.rand(1, 1, *patch))  # warm-up
    out = {}
    for ov in overlaps:
        t = time.perf_counter()
        for _ in range(repeats):
            sliding_window_predict(net, x, patch, overlap=ov, sw_batch_size=2)
        out[ov] = (time.perf_counter() - t) / repeats
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 x 256 x 75 instead of 512 x 512 x 150")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    try:
        import medpy  # noqa: F401
    except ImportError:
        print("error: medpy is needed for this benchmark: pip install medpy", file=sys.stderr)
        return 1
    print(f"torch threads: {torch.get_num_threads()}")
    pred, truth, spacing = make_volumes(args.quick)
    print(f"volume {truth.shape}, spacing {tuple(round(s, 3) for s in spacing)} mm, 13 organs")
    r = bench_metrics(pred, truth, spacing)
    print()
    print("| per-organ Dice + HD95, 13 organs | time (s) | vs medpy |")
    print("|---|---|---|")
    print(f"| medpy dc + hd95 (mm, full volume) | {r['t_medpy_s']:.2f} | 1.0× |")
    print(f"| ours, standard (MONAI; Dice + HD95 + ASD, mm) | {r['t_ours_s']:.2f} | {r['speedup']:.1f}× faster |")
    print(f"| medpy dc + hd95 (voxels, as DHC) | {r['t_medpy_vox_s']:.2f} | 1.0× |")
    print(f"| ours, --protocol dhc (voxels) | {r['t_ours_dhc_s']:.2f} | {r['speedup_dhc']:.1f}× faster |")
    print()
    print(f"Dice: max |ours - medpy| = {r['dice_max_abs_diff']:.2e}")
    print(f"HD95, dhc protocol (medpy's definition: pooled 95th percentile) vs medpy: "
          f"max |diff| = {r['hd95_dhc_vs_medpy_max_abs_diff_vox']:.2e} voxels")
    print(f"HD95, standard (MONAI: max of the two directed 95th percentiles) vs medpy (mm): "
          f"max |diff| = {r['hd95_monai_vs_medpy_max_abs_diff_mm']:.3f} mm "
          f"(relative: max {100 * r['hd95_monai_vs_medpy_max_rel_diff']:.1f} %, median "
          f"{100 * r['hd95_monai_vs_medpy_median_rel_diff']:.1f} %; a different definition, see metrics.py)")
    if not args.skip_inference:
        inf = bench_inference()
        r["inference_s"] = {str(k): v for k, v in inf.items()}
        print()
        print("| sliding window, UNet [16,32,64,128], CPU, 160×160×96, patch 96³, sw_batch 2 | time (s) |")
        print("|---|---|")
        for ov, t in inf.items():
            print(f"| overlap {ov} | {t:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
