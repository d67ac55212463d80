"""Seconds per test module from a pytest JUnit XML report, as the table in docs/testing.md.

    python -m pytest -q -p no:cacheprovider --junitxml=suite.xml
    python scripts/suite_times.py suite.xml [--before before.xml]

A module's time is the sum of its tests' times as pytest reports them: a session fixture's set-up (a shared
`main_ppo` run) is charged to the first test that requests it, so a module that shares a run may show 0 s.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def module_seconds(report: Path) -> dict[str, float]:
    """'path/to/test_x.py' -> seconds, over every <testcase> of the report (skipped ones count their time too)."""
    if not report.is_file():
        raise SystemExit(f"suite_times: {report} is not a file (pytest --junitxml=<file> writes it)")
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")  # plugins.c3po.tests.test_rules[.TestClass]
        end = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
        seconds["/".join(parts[:end + 1]) + ".py"] += float(case.get("time", 0.0))
    return dict(seconds)


def table(after: dict[str, float], before: dict[str, float] | None = None) -> str:
    head = "| module | seconds |" + (" before |" if before is not None else "")
    rule = "|---|---:|" + ("---:|" if before is not None else "")
    names = sorted(set(after) | set(before or {}), key=lambda m: -max(after.get(m, 0), (before or {}).get(m, 0)))
    rows = []
    for name in names:
        row = f"| `{name}` | {after.get(name, 0):.0f} |"
        if before is not None:
            row += f" {before.get(name, 0):.0f} |"
        rows.append(row)
    total = f"| all | {sum(after.values()):.0f} |" + (f" {sum(before.values()):.0f} |" if before is not None else "")
    return "\n".join([head, rule, *rows, total])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="pytest's JUnit XML (--junitxml)")
    parser.add_argument("--before", type=Path, help="an earlier report: a second column of seconds")
    args = parser.parse_args(argv)
    print(table(module_seconds(args.report), module_seconds(args.before) if args.before else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
