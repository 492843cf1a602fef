"""The main job end to end: ``medseg-dpl demo --quick`` (phantom -> prep -> split -> train the
three methods -> eval -> tables and figures), as a user runs it."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medseg_dpl.cli import main
from medseg_dpl.demo import ALIASES, METHODS, _config


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out

    for name in ("results.csv", "results.md", "dice_per_organ.png", "pseudo_label_distribution.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = (out / "results.md").read_text(encoding="utf-8")
    assert table in printed  # the printed table is results.md

    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"method", "seed", "organ", "dice", "dice_raw", "hd95", "hd95_raw"}
    classes = json.loads((out / "prep" / "dataset.json").read_text(encoding="utf-8"))["classes"]
    assert {r["method"] for r in rows} == set(METHODS)
    assert len(rows) == len(METHODS) * (len(classes) - 1)
    dice = np.array([float(r["dice"]) for r in rows])
    assert np.all((dice[np.isfinite(dice)] >= 0) & (dice[np.isfinite(dice)] <= 1))
    # even 40 steps find the liver, the largest organ
    liver = [float(r["dice"]) for r in rows if r["organ"] == "liver"]
    assert max(liver) > 0.2, liver
    for m in METHODS:
        assert f"| {m} |" in table
        run = out / "runs" / f"{m}_seed0"
        assert (run / "checkpoints" / "best.pt").is_file() and (run / "eval" / "per_case.csv").is_file()
        assert any((run / "tb").iterdir())


@pytest.mark.parametrize("row", sorted(ALIASES))
def test_every_benchmark_row_builds_its_method(row, tmp_path):
    """An alias with a misspelt key or a bad value fails here, not an hour into a benchmark."""
    import torch

    from medseg_dpl.methods import get_method

    cfg = _config(row, tmp_path, tmp_path, "5p", 0, None, None, "cpu", False, [])
    method, fixed = ALIASES[row]
    assert cfg["method"]["name"] == method
    for override in fixed:          # each override reached the merged config
        key, value = override.split("=", 1)
        section, name = key.split(".")
        assert str(cfg[section][name]).lower() == value.lower() or float(cfg[section][name]) == float(value)
    net = torch.nn.Conv3d(1, 14, 1)
    get_method(method)(net, cfg, num_classes=14)


@pytest.mark.parametrize("argv, steps", [([], 800), (["--quick"], None), (["--steps", "1600"], 1600)])
def test_demo_trains_half_the_benchmark_schedule_unless_told(argv, steps, tmp_path, monkeypatch):
    # the config carries the converged 1600 steps (the benchmark's); the demo verb runs 800
    # to keep within its time target, --quick its own 40 (steps=None -> the quick size)
    import medseg_dpl.demo as demo
    from medseg_dpl.config import load_config
    from medseg_dpl.engine.defaults import SEG_DEFAULTS

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(kw))
    assert main(["demo", "--out", str(tmp_path), *argv]) == 0
    assert seen["steps"] == steps
    cfg = load_config(demo.CONFIG_DIR / "phantom.yaml", [], SEG_DEFAULTS)
    assert cfg["train"]["steps"] == 2 * demo.DEMO_STEPS and cfg["train"]["val_every"] == 400
