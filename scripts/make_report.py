"""Write the reproduction report from the committed results (no training).

    python scripts/make_report.py --results results --out results/REPORT.md

One row per claim of the paper: the section, the paper's number, ours with a 95 % interval
over seeds, and a verdict by the rule the report states (bnrepro.analysis.report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnrepro.analysis.report import build_report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("results/REPORT.md"))
    args = parser.parse_args()
    if not args.results.is_dir():
        print(f"error: no results folder {args.results}", file=sys.stderr)
        return 2
    report = build_report(args.results)
    args.out.write_text(report)
    print(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
