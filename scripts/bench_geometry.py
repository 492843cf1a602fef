#!/usr/bin/env python
"""Network geometries for the CPU benchmarks: cost per crop, where the compute sits, step time.

For each geometry (UNet widths, residual units, strides): parameters, forward GFLOP per crop
(``torch.utils.flop_counter``, exact for convolutions), the share of the forward FLOPs in the
single most expensive module, and the median / min time of one supervised training step
(``build_training`` + ``optimisation_step``, batch 2, one thread) — the cost side of "converged
eval Dice per CPU-minute"; the Dice side comes from training runs (``bench_ssl.py --steps``).

    OMP_NUM_THREADS=1 python scripts/bench_geometry.py --patch 40 40 32 --classes 14
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg_dpl.config import load_config
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.engine.trainer import build_training, optimisation_step
from medseg_dpl.models import build_model

# name -> model.* overrides
GEOMETRIES = {
    "[8,16,32,64] res1 (current)": ["model.channels=[8,16,32,64]", "model.strides=[2,2,2]", "model.num_res_units=1"],
    "[8,16,32,64] res0": ["model.channels=[8,16,32,64]", "model.strides=[2,2,2]", "model.num_res_units=0"],
    "[8,16,32,64] res1 first stride 1": ["model.channels=[8,16,32,64]", "model.strides=[1,2,2]",
                                         "model.num_res_units=1"],
    "[16,32,64,128] res1": ["model.channels=[16,32,64,128]", "model.strides=[2,2,2]", "model.num_res_units=1"],
    "[8,16,32,64] res2": ["model.channels=[8,16,32,64]", "model.strides=[2,2,2]", "model.num_res_units=2"],
}


def flops(net: torch.nn.Module, x: torch.Tensor) -> tuple[float, str, float]:
    """(forward GFLOP, the most expensive leaf module's name, its share)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    total = counter.get_total_flops()
    per = counter.get_flop_counts()
    # the deepest modules only (parents repeat their children's counts)
    leaves = {k: sum(v.values()) for k, v in per.items()
              if k != "Global" and not any(o != k and o.startswith(k + ".") for o in per)}
    name, top = max(leaves.items(), key=lambda kv: kv[1])
    return total / 1e9, name, top / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", type=int, nargs=3, default=[40, 40, 32])
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--steps", type=int, default=6, help="timed supervised steps per geometry")
    ap.add_argument("--only", nargs="*", default=None, help="names (substrings) of GEOMETRIES to run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"patch {args.patch}, {args.classes} classes, batch 2, 1 thread\n")
    print("| geometry | params (k) | GFLOP/crop fwd | top module (share) | s/step median | s/step min |")
    print("|---|---|---|---|---|---|")
    for name, ov in GEOMETRIES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        cfg = load_config(None, [*ov, "method.name=supervised", f"data.patch_size={args.patch}",
                                 "train.amp=none"], SEG_DEFAULTS)
        net = build_model(cfg["model"], 1, args.classes).eval()
        gflop, top, share = flops(net, torch.rand(1, 1, *args.patch))
        algo, teacher, opt, scaler, params = build_training(
            cfg, args.classes, torch.full((args.classes,), 1.0 / args.classes), torch.device("cpu"))
        algo.train()
        g = torch.Generator().manual_seed(0)
        batch = {"image": torch.rand(2, 1, *args.patch, generator=g),
                 "label": torch.randint(0, args.classes, (2, 1, *args.patch), generator=g)}
        times = []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            optimisation_step(algo, batch, step, opt, scaler, params, cfg["optim"]["grad_clip"],
                              torch.device("cpu"), False, torch.bfloat16)
            teacher.update(algo.student, step)   # the trainer's EMAHook
            times.append(time.perf_counter() - t0)
        times = times[1:]   # the first step allocates
        n_params = sum(p.numel() for p in net.parameters()) / 1e3
        print(f"| {name} | {n_params:.0f} | {gflop:.3f} | {top} ({100 * share:.0f} %) | "
              f"{statistics.median(times):.3f} | {min(times):.3f} |", flush=True)


if __name__ == "__main__":
    main()
