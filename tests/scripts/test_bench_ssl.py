"""The benchmark runner: parallel cells (--jobs), a committed record (--record) and tables rebuilt
from it alone (--report-only), as the README's tables are."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ssl.py"), *args], env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)


def test_jobs_record_and_report_only(tmp_path):
    out, record = tmp_path / "out", tmp_path / "record"
    r = _bench("--out", str(out), "--quick", "--steps", "2", "--fractions", "0.2", "--seeds", "0", "1",
               "--methods", "atlas", "supervised", "--jobs", "2", "--record", str(record), "--",
               "eval.postprocess=false")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "4 runs, 2 at a time" in r.stdout
    rows = list(csv.DictReader(open(out / "20p" / "results.csv")))
    assert {(x["method"], x["seed"]) for x in rows} == {(m, s) for m in ("atlas", "supervised") for s in "01"}
    assert {"method", "seed", "organ", "dice", "dice_raw", "hd95"} <= set(rows[0])
    # the record holds the small files only, and the command
    run = record / "20p" / "runs" / "supervised_seed1"
    assert {p.name for p in run.rglob("*") if p.is_file()} == {"summary.json", "metrics.json",
                                                                "pseudo_labels.json", "config.yaml"}
    assert "--record" in (record / "commands.txt").read_text(encoding="utf-8")
    # tables from the record alone equal those of the run folder
    r2 = _bench("--out", str(record), "--report-only", "--fractions", "0.2", "--seeds", "0", "1",
                "--methods", "atlas", "supervised")
    assert r2.returncode == 0, r2.stderr[-2000:]
    again = list(csv.DictReader(open(record / "20p" / "results.csv")))
    assert again == rows
    assert "| supervised |" in (record / "bench_ssl.md").read_text(encoding="utf-8")


def test_paired_table_lists_each_pair_once_with_debiaspl_as_a_reference():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_ssl import paired_table

    dice = {("fixmatch", 0): 0.40, ("fixmatch", 1): 0.50, ("debiaspl", 0): 0.45, ("debiaspl", 1): 0.48,
            ("dhc", 0): 0.42, ("dhc", 1): 0.49}
    rows = [{"method": m, "seed": s, "organ": o, "dice": d} for (m, s), d in dice.items() for o in ("liver", "spleen")]
    table = paired_table(rows, ["fixmatch", "debiaspl", "dhc"])
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "method" not in ln]
    pairs = [tuple(c.strip() for c in ln.split("|")[1:3]) for ln in lines]
    assert pairs == [("debiaspl", "fixmatch"), ("dhc", "fixmatch"), ("dhc", "debiaspl")]
    assert lines[2].split("|")[3:7] == [" -3.0 ", " +1.0 ", " -1.0 ", " 1/2 "]
