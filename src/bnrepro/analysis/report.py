"""The reproduction report: each claim of the paper, our number with a 95 % confidence interval
over seeds, and a verdict by a stated rule (`make report` writes results/REPORT.md).

It reads only the committed results (results/*/<figure>.json and the run logs stored beside
them); it trains nothing, and the same results give the same report byte for byte. The claims
are records (bnrepro.analysis.claims), the intervals and the rule arithmetic
(bnrepro.analysis.stats, which tests/test_report.py checks on hand-made results); `render`
turns the assessed claims into REPORT.md. Nobody picks a verdict by hand, nor types a count:
README.md's are the block `readme_counts` writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bnrepro.analysis.claims import CLAIMS, Claim, Finding, Results, assess, check_claims
from bnrepro.analysis.runs import provenance_of
from bnrepro.analysis.stats import (
    CONSTANTS,
    NOT_REPRODUCED,
    NOT_TESTED,
    VERDICT_RULE,
    VERDICTS,
)
from bnrepro.errors import UserError

# The lines around README.md's verdict counts; `make report` rewrites what lies between them.
README_BEGIN = "<!-- verdict counts: written by `make report` from results/REPORT.md -->"
README_END = "<!-- end of verdict counts -->"


@dataclass(frozen=True)
class Row:
    """A claim with its finding on the committed results (None: not tested here)."""

    claim: Claim
    finding: Finding | None

    @property
    def ours(self) -> str:
        return self.finding.ours if self.finding else "-"

    @property
    def verdict(self) -> str:
        return self.finding.verdict if self.finding else NOT_TESTED


def assess_claims(results: Path, claims: Sequence[Claim] = CLAIMS) -> list[Row]:
    """Every claim's row on the results under `results`, in the order of `claims`."""
    check_claims(claims)
    loaded = Results(results)
    return [Row(claim, assess(claim, loaded)) for claim in claims]


def provenance(results: Path, claims: Sequence[Claim] = CLAIMS) -> list[str]:
    """A markdown table: per results folder the claims read, the code (commits), torch and
    devices behind its runs (their summary.json; "not recorded" for runs made before)."""
    folders: dict[str, list[int]] = {}
    for claim in claims:
        for folder in dict.fromkeys(source.split("/")[0] for source in claim.results):
            folders.setdefault(folder, []).append(claim.number)
    loaded = Results(results)
    lines = [
        "| results | claims | runs | commits | torch | devices |",
        "|---|---|---|---|---|---|",
    ]
    for folder, numbers in folders.items():
        runs = loaded.load(folder) or []
        origin = provenance_of(runs) if runs else {}
        cells = [
            f"`{folder}/`",
            ", ".join(map(str, numbers)),
            str(len(runs)),
            *(", ".join(origin.get(key, ["-"])) for key in ("commits", "torch", "devices")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(rows: Sequence[Row], source: str, finding: str) -> list[str]:
    """One markdown table row per claim (links relative to results/)."""
    lines = [
        f"| # | claim | {source} | {finding} | ours (95 % interval) | verdict | figure | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row.claim
        # A claim not assessed links no figure: there is none of its results.
        figure = f"[{Path(c.figure).name}]({c.figure})" if c.figure and row.finding else "-"
        cells = [
            str(c.number),
            c.claim,
            c.section,
            c.paper,
            row.ours,
            f"**{row.verdict}**",
            figure,
            f"`{c.command}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tally(rows: Sequence[Row]) -> str:
    """'12 reproduced, 3 partly, 1 not reproduced, 1 not tested here'."""
    return ", ".join(f"{sum(r.verdict == v for r in rows)} {v}" for v in VERDICTS)


def counts(rows: Sequence[Row]) -> str:
    return f"Verdicts: {tally(rows)}."


def constants() -> list[str]:
    """The rule's constants, one bullet each, with the values stats.py holds."""
    return [f"- `{name}` = {value!r}: {meaning}" for name, value, meaning in CONSTANTS]


def designs(results: Path, claims: Sequence[Claim] = CLAIMS) -> list[str]:
    """One bullet per results file that states its design (a "design" field, as
    fig2_small/figure3.json has): which claims read it and how it was measured."""
    lines = []
    for source in sorted({s for c in claims for s in c.results}):
        path = results / source
        design = json.loads(path.read_text()).get("design") if path.is_file() else None
        if design:
            numbers = ", ".join(str(c.number) for c in claims if source in c.results)
            lines.append(f"- Claims {numbers} (`{source}`): {design}")
    return lines


def render(rows: Sequence[Row], origin: Sequence[str] = (), design: Sequence[str] = ()) -> str:
    """REPORT.md: the rule and its constants, the paper's claims (with the `design` of the
    experiments that state one), the follow-up claims of later work, then where the results
    came from (`origin`, the lines of `provenance`)."""
    paper = [r for r in rows if not r.claim.follow_up]
    follow_up = [r for r in rows if r.claim.follow_up]
    lines = [
        "# Reproduction report",
        "",
        "Generated by `make report` (`scripts/make_report.py`) from the committed results in",
        "`results/` only; no training. Do not edit by hand: change the results, the claims",
        "(`src/bnrepro/analysis/claims.py`) or the rule (`src/bnrepro/analysis/stats.py`) and",
        "run `make report` again.",
        "",
        "## The verdict rule",
        "",
        VERDICT_RULE.rstrip(),
        "",
        "Constants (`src/bnrepro/analysis/stats.py`):",
        "",
        *constants(),
        "",
        "## The paper's claims",
        "",
        *([*design, ""] if design else []),
        *table(paper, "section", "paper"),
        "",
        counts(paper),
        "",
    ]
    if follow_up:
        lines += [
            "## Follow-up claims",
            "",
            "What later papers found about BN, tested on this suite's MNIST network with the same",
            'verdict rule (README, "Beyond the paper"). The published numbers are for their',
            "networks and data, not ours: the verdict is about the direction of the finding.",
            "",
            *table(follow_up, "source", "published"),
            "",
            counts(follow_up),
            "",
        ]
    if origin:
        lines += [
            "## Provenance",
            "",
            "The code and machines behind each results folder, from its runs' `summary.json`",
            '(`provenance`; runs made before summaries recorded it: "not recorded").',
            "",
            *origin,
            "",
        ]
    return "\n".join(lines)


def build_report(results: Path, claims: Sequence[Claim] = CLAIMS) -> str:
    """REPORT.md for the results under `results`."""
    return render(
        assess_claims(results, claims), provenance(results, claims), designs(results, claims)
    )


def readme_counts(rows: Sequence[Row], report: str = "results/REPORT.md") -> str:
    """README.md's verdict counts (`report`: REPORT.md's path from README.md), with the
    claims that were not reproduced named."""
    lines = []
    for label, anchor, follow_up in (
        ("The paper's claims", "the-papers-claims", False),
        ("Follow-up claims", "follow-up-claims", True),
    ):
        part = [r for r in rows if r.claim.follow_up == follow_up]
        if not part:
            continue
        failed = "; ".join(
            f"claim {r.claim.number} ({r.claim.claim})" for r in part if r.verdict == NOT_REPRODUCED
        )
        lines.append(
            f"- [{label}]({report}#{anchor}): {tally(part)}."
            + (f" Not reproduced: {failed}." if failed else "")
        )
    return "\n".join(lines)


def with_readme_counts(readme: str, counts_block: str) -> str:
    """`readme` with the text between README_BEGIN and README_END replaced by `counts_block`."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise UserError(
            f"README has no verdict-count block: put {README_BEGIN!r} and {README_END!r} on "
            "lines of their own where the counts go"
        )
    return readme[: begin + len(README_BEGIN)] + "\n" + counts_block + "\n" + readme[end:]


def update_readme(readme: Path, out: Path, rows: Sequence[Row]) -> bool:
    """Rewrite README.md's verdict counts from `rows` (REPORT.md written to `out`); True when
    they changed. Only the block is touched, and the file only when it differs."""
    text = readme.read_text()
    report = Path(os.path.relpath(out.resolve(), readme.resolve().parent)).as_posix()
    new = with_readme_counts(text, readme_counts(rows, report))
    if new == text:
        return False
    readme.write_text(new)
    return True
