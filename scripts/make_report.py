"""Write the reproduction report from the committed results (no training).

    python scripts/make_report.py --results results --out results/REPORT.md

One row per claim of the paper: the section, the paper's number, ours with a 95 % interval
over seeds, and a verdict by the rule the report states (bnrepro.analysis.report; the claims
are records in bnrepro.analysis.claims). The verdict counts in README.md (the block between
its `verdict counts` markers; by default the README.md beside the results folder) are
rewritten from the same rows, so they cannot drift from the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnrepro.analysis.report import assess_claims, provenance, render, update_readme
from bnrepro.errors import UserError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("results/REPORT.md"))
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="README.md whose verdict counts to rewrite (default: the one beside --results)",
    )
    parser.add_argument("--no-readme", action="store_true", help="leave every README alone")
    args = parser.parse_args()
    if not args.results.is_dir():
        print(f"error: no results folder {args.results}", file=sys.stderr)
        return 2
    rows = assess_claims(args.results)
    report = render(rows, provenance(args.results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"wrote {args.out}")
    readme = args.readme or args.results.resolve().parent / "README.md"
    if args.no_readme or (args.readme is None and not readme.is_file()):
        return 0
    try:
        changed = update_readme(readme, args.out, rows)
    except (OSError, UserError) as e:
        print(f"error: {readme}: {e}", file=sys.stderr)
        return 2
    print(f"{'updated' if changed else 'unchanged:'} {readme}'s verdict counts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
