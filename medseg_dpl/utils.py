"""Small shared helpers: atomic writes, seeding, the one device resolver."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file, and a crash leaves the old file (or none).
    The temporary name keeps the suffixes (``.nii.gz``) so writers that infer the format work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600; give the file the usual mode under the umask
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def seed_everything(seed: int) -> None:
    import torch  # lazily: data worker processes import this module and need no torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def resolve_device(name, key: str = "train.device"):
    """The one device rule of every verb: ``auto`` (CUDA when available, else CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; under torchrun ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``. Anything
    else, CUDA asked for but absent, or N beyond the visible devices is a ``ConfigError`` naming
    ``key`` (a typo must not silently run on the CPU)."""
    import re

    import torch

    from medseg_dpl.config import ConfigError

    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available on this machine")
    index = int(m.group(1)) if m.group(1) is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)
