"""Two gloo processes on CPU (the torchrun code path: WORLD_SIZE/RANK/MASTER_* in the environment):
a few DebiasPL steps, q̂ and the student weights identical on both ranks, outputs from rank 0."""
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from train_helpers import make_tiny_prep

HERE = Path(__file__).resolve().parents[1]  # tests/: the helper modules


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, prep: str, out: str, dump: str) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from train_helpers import tiny_cfg
    from medseg_dpl.core.ema import unwrap
    from medseg_dpl.engine.trainer import train
    from medseg_dpl.methods.debiaspl import DebiasPL

    seen = {}
    orig = DebiasPL.train_step

    def record(self, batch, step):
        out = orig(self, batch, step)
        seen.setdefault("qhat", []).append(self.qhat.clone())
        seen["algo"] = self
        return out

    DebiasPL.train_step = record
    train(tiny_cfg(prep, "debiaspl", "train.steps=3", "train.val_every=3"), out)
    import torch.distributed as dist
    torch.save({"qhat": torch.stack(seen["qhat"]),
                "student": unwrap(seen["algo"].student).state_dict(),
                "world": dist.get_world_size()}, Path(dump) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    prep = make_tiny_prep(tmp_path / "prep")
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(prep), str(out), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["qhat"].shape == (3, 4)
    assert torch.equal(r0["qhat"], r1["qhat"])                 # q̂ all-reduced every step
    assert not torch.allclose(r0["qhat"][-1], torch.full((4,), 0.25))
    for k, v in r0["student"].items():                          # DDP kept the replicas equal
        assert torch.allclose(v, r1["student"][k], atol=1e-6), k
    assert (out / "checkpoints/last.pt").is_file() and (out / "pseudo_labels.json").is_file()
    assert "2 process(es)" in (out / "train.log").read_text(encoding="utf-8")
