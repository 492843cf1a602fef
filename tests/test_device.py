"""One strict device rule for every verb: a typo or an absent device is an error naming the key."""
import pytest
import torch

from medseg_dpl.config import ConfigError
from medseg_dpl.utils import resolve_device


def test_resolve_device_accepts_the_four_forms_and_refuses_the_rest():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None).type == resolve_device("auto").type
    for bad in ("gpu", "cdua", "cuda:x", "cuda:-1", "mps"):
        with pytest.raises(ConfigError, match="train.device: expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("gpu", key="--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_on_a_cpu_machine_is_refused_not_silently_cpu(tmp_path):
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(name)
    from train_helpers import make_tiny_prep, tiny_cfg

    from medseg_dpl.engine.trainer import train
    prep = make_tiny_prep(tmp_path / "prep")
    with pytest.raises(ConfigError, match="train.device=cuda:1"):
        train(tiny_cfg(prep, "supervised", "train.device=cuda:1"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
