"""The main job end to end: ``medseg-dpl demo --quick`` (phantom -> prep -> split -> train the
three methods -> eval -> tables and figures), as a user runs it."""
from __future__ import annotations

import csv
import json

import numpy as np

from medseg_dpl.cli import main
from medseg_dpl.demo import METHODS


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
