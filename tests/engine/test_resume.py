"""Kill-and-resume: a deterministic CPU run SIGKILLed after a checkpoint, then resumed with
``--resume``, ends with the same weights and method state (q̂; DHC's class weights and their
EMAs) as an uninterrupted run; ga (stateless GA loss) checks both networks."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import make_tiny_prep

HERE = Path(__file__).resolve().parents[1]  # tests/: the helper modules
STEPS, EVERY = 8, 2

# Runs the trainer in a fresh process. SLOW=1 sleeps after each step from step EVERY on, so the
# parent can kill it mid-run; sleeping changes no number.
SCRIPT = f"""
import sys, time
sys.path.insert(0, {str(HERE)!r})
import torch
torch.set_num_threads(1)
from train_helpers import tiny_cfg
from medseg_dpl.methods import get_method
from medseg_dpl.engine.trainer import train
prep, out, resume, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
method = sys.argv[5]
if slow:
    cls = get_method(method)
    orig = cls.train_step
    def step_then_sleep(self, batch, step):
        if step >= {EVERY}:
            time.sleep(1.0)
        return orig(self, batch, step)
    cls.train_step = step_then_sleep
cfg = tiny_cfg(prep, method, "train.steps={STEPS}", "train.checkpoint_every={EVERY}",
               "train.val_every=100", "train.deterministic=true", "data.num_workers=0",
               "model.dropout=0.1")
train(cfg, out, resume=resume)
"""


def _run(prep, out, method, resume=False, slow=False, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", SCRIPT, str(prep), str(out), str(int(resume)), str(int(slow)), method]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    return proc


def _final(out):
    return torch.load(out / "checkpoints/last.pt", weights_only=True)


@pytest.mark.parametrize("method", ["debiaspl", "dhc", "ga"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, method):
    prep = make_tiny_prep(tmp_path / "prep")
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(prep, full, method)

    proc = _run(prep, killed, method, slow=True, wait=False)
    last = killed / "checkpoints/last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert last.exists(), "no checkpoint was written before the deadline"
    time.sleep(1.5)  # let it get past the checkpoint into the next steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(last, weights_only=True)["step"]
    assert 0 < step_at_kill < STEPS, "the run must be killed mid-run"

    _run(prep, killed, method, resume=True)
    a, b = _final(full), _final(killed)
    assert a["step"] == b["step"] == STEPS
    for key in ("student", "teacher") if method == "debiaspl" else ("student", "student2"):
        for name, t in a[key].items():
            assert torch.allclose(t.float(), b[key][name].float(), atol=1e-6, rtol=0), f"{key}.{name}"
    assert set(a["method"]) == set(b["method"])
    for name, t in a["method"].items():
        assert torch.allclose(t.float(), b["method"][name].float(), atol=1e-6, rtol=0), f"method.{name}"
    if method == "debiaspl":
        assert not torch.allclose(a["method"]["response.qhat"], torch.full((4,), 0.25))
    elif method == "dhc":  # the class weights moved away from their start
        assert a["method"]["learn"].abs().sum() > 0 and not torch.all(a["method"]["weight_a"] == 4.0)
    log = (killed / "train.log").read_text(encoding="utf-8")
    assert f"resumed from {last} at step {step_at_kill}" in log
