#!/usr/bin/env python
"""Step time and peak memory of supervised, FixMatch and DebiasPL at the same batch and patch.

One optimisation step exactly as the trainer runs it (``build_training`` + ``optimisation_step``:
forward under autocast, backward, clipping, optimiser, EMA teacher), on synthetic in-memory
batches so data loading is not timed. Methods are interleaved step by step and the median and
minimum per-step times are reported (on a shared machine the minimum is the least disturbed
estimate), so load from other processes hits all of them alike; the ratio debiaspl/fixmatch
(target <= 1.02) comes from the same run.
Peak memory: CUDA ``max_memory_allocated`` per method; on CPU each method's peak resident set
is measured in a fresh child process (ru_maxrss; the process baseline is printed separately).

    python scripts/bench_train.py                      # CPU, patch 48³, batch 2+2
    python scripts/bench_train.py --device cuda --patch 64 128 128 --batch 2 --amp bf16
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch

from medseg_dpl.config import load_config
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.engine.trainer import build_training, optimisation_step

METHODS = ("supervised", "fixmatch", "debiaspl")


def make_cfg(args, method):
    ov = [f"method.name={method}", f"data.patch_size={list(args.patch)}",
          f"model.name={args.model}", f"model.channels={list(args.channels)}",
          f"model.strides={[2] * (len(args.channels) - 1)}", f"train.amp={args.amp}",
          "method.threshold=0.5", "debias.momentum=0.99"]
    return load_config(None, ov, SEG_DEFAULTS)


def make_batch(args, device):
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, *args.patch)
    batch = {"image": torch.rand(shape, generator=g),
             "label": torch.randint(0, args.classes, shape, generator=g),
             "image_weak": torch.rand(shape, generator=g),
             "image_strong": torch.rand(shape, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


class Runner:
    def __init__(self, args, method, device):
        self.cfg = make_cfg(args, method)
        prior = torch.full((args.classes,), 1.0 / args.classes)
        self.algo, self.teacher, self.opt, self.scaler, self.params = build_training(
            self.cfg, args.classes, prior, device)
        self.algo.train()
        self.device, self.batch, self.step = device, make_batch(args, device), 0
        self.use_amp = device.type == "cuda" and args.amp != "none"
        self.dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16

    def run(self, n):
        times = []
        for _ in range(n):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimisation_step(self.algo, self.batch, self.step, self.opt, self.scaler, self.params,
                              self.cfg["optim"]["grad_clip"], self.device, self.use_amp, self.dtype)
            if self.teacher is not None:   # the trainer's EMAHook
                self.teacher.update(self.algo.student, self.step)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            self.step += 1
        return times


def _vm_hwm_mib() -> float:
    """Peak resident set of this process (Linux VmHWM; unlike ru_maxrss not inherited via exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_peak_child(args, method, q):
    torch.set_num_threads(args.threads)
    base = _vm_hwm_mib()
    r = Runner(args, method, torch.device("cpu"))
    r.run(2)
    q.put((method, base, _vm_hwm_mib()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--patch", type=int, nargs=3, default=[48, 48, 48])
    ap.add_argument("--batch", type=int, default=2, help="labeled and unlabeled volumes per step")
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--model", default="UNet")
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runners = {m: Runner(args, m, device) for m in METHODS}
    for r in runners.values():
        r.run(2)  # warm-up
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for _ in range(args.steps):  # round-robin step by step: load from others hits all alike
            for m in METHODS:
                times[m] += runners[m].run(1)
    peak = {}
    base_mb = float("nan")
    if device.type == "cuda":
        for m in METHODS:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            runners[m].run(2)
            peak[m] = torch.cuda.max_memory_allocated() / 2**20
    else:
        del runners
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        for m in METHODS:
            p = ctx.Process(target=_cpu_peak_child, args=(args, m, q))
            p.start()
            method, base, top = q.get()
            p.join()
            peak[method] = top
        base_mb = base
    med = {m: statistics.median(times[m]) for m in METHODS}
    best = {m: min(times[m]) for m in METHODS}
    vox = 2 * args.batch * args.patch[0] * args.patch[1] * args.patch[2]
    print(f"device {args.device} ({torch.get_num_threads()} threads), {args.model} {args.channels}, "
          f"patch {'x'.join(map(str, args.patch))}, batch {args.batch} labeled + {args.batch} unlabeled, "
          f"{args.classes} classes, amp {args.amp if device.type == 'cuda' else 'off (CPU)'}; "
          f"median of {args.rounds}x{args.steps} interleaved steps")
    mem_col = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| method | median step (s) | min step (s) | {mem_col} | median ratio to fixmatch | min ratio to fixmatch |")
    print("|---|---|---|---|---|---|")
    for m in METHODS:
        print(f"| {m} | {med[m]:.3f} | {best[m]:.3f} | {peak[m]:.0f} | {med[m] / med['fixmatch']:.3f} "
              f"| {best[m] / best['fixmatch']:.3f} |")
    for name, d in (("median", med), ("min", best)):
        ratio = d["debiaspl"] / d["fixmatch"]
        print(f"debiaspl/fixmatch {name} step time: {ratio:.3f} "
              f"(target <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'})")
    if device.type == "cuda":
        print(f"GPU voxels/s (debiaspl, {args.amp}): {vox / med['debiaspl']:.3e}")
    else:
        print(f"CPU peak RSS includes the process baseline of {base_mb:.0f} MiB (torch + MONAI imported)")
        print("GPU voxels/s: not measured (no GPU in this run)")


if __name__ == "__main__":
    main()
