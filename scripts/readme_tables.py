#!/usr/bin/env python
"""Refresh the README's benchmark tables from the committed records.

Each block of README.md between ``<!-- tables: benchmarks/NAME -->`` and ``<!-- /tables -->`` is
replaced by ``benchmarks/NAME/bench_ssl.md`` (or, for ``benchmarks/NAME/FILE.md``, that file:
``scripts/ablation_table.py`` writes one), which ``scripts/bench_ssl.py --report-only --out
benchmarks/NAME ...`` rebuilds from the per-run files alone (test and eval Dice per organ and
seed, pseudo-label statistics). So every number in those tables can be traced to a file.

    python scripts/bench_ssl.py --out benchmarks/phantom --report-only --methods ...
    python scripts/readme_tables.py            # rewrites README.md in place
    python scripts/readme_tables.py --check    # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- tables: (benchmarks/[\w./-]+) -->\n)(.*?)(<!-- /tables -->)", re.S)


def refresh(text: str) -> str:
    def fill(m: re.Match) -> str:
        # a folder: its bench_ssl.md; or a markdown file (e.g. benchmarks/phantom/ablation.md)
        src = ROOT / m.group(2) if m.group(2).endswith(".md") else ROOT / m.group(2) / "bench_ssl.md"
        if not src.is_file():
            raise SystemExit(f"{src}: not found (run scripts/bench_ssl.py --report-only --out {m.group(2)})")
        body = src.read_text(encoding="utf-8").replace("\n### ", "\n#### ")
        if body.startswith("### "):
            body = "#" + body
        return m.group(1) + body.rstrip() + "\n" + m.group(4)
    return BLOCK.sub(fill, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--check", action="store_true", help="only report whether the README is current")
    args = ap.parse_args()
    path = Path(args.readme)
    old = path.read_text(encoding="utf-8")
    new = refresh(old)
    if args.check:
        print("README tables are current" if new == old else "README tables are out of date")
        sys.exit(0 if new == old else 1)
    path.write_text(new, encoding="utf-8")
    print(f"{path}: {len(BLOCK.findall(old))} table block(s) refreshed")


if __name__ == "__main__":
    main()
