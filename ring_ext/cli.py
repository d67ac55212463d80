"""`ring-ext`: list installed plugins and what they registered, and the shipped recipes."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Sequence


def _plugins(args: argparse.Namespace) -> int:
    import verl  # noqa: F401  (verl's entry-point loader runs ring-ext's discovery)

    from ring_ext.discovery import load_plugins

    reports = load_plugins()
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
        return 0
    if not reports:
        print("no ring-ext plugins installed (pip install plugins/<name>)")
    for report in reports:
        status = f"FAILED: {report.error}" if report.error else "ok"
        print(f"{report.name}  ({report.distribution} {report.version})  {status}")
        for reg in report.registrations:
            print(f"    {reg.kind:<18} {reg.name:<32} {reg.detail}")
    return 1 if any(r.error for r in reports) else 0


def _recipes(args: argparse.Namespace) -> int:
    from ring_ext.recipes import list_recipes

    recipes = list_recipes()
    if args.json:
        print(json.dumps([asdict(r) for r in recipes], indent=2))
        return 0
    for recipe in recipes:
        print(f"{recipe.name:<16} {recipe.summary}")
    print("\nrun one with: python -m verl.trainer.main_ppo +recipe=<name> [overrides...]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ring-ext",
        description="Ring-1T techniques as verl plugins. Training runs through verl's own entry point: "
        "python -m verl.trainer.main_ppo +recipe=ring1t",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list installed ring-ext plugins, versions and registrations")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)
    recipes = sub.add_parser("recipes", help="list the Hydra recipes (+recipe=<name>)")
    recipes.add_argument("--json", action="store_true", help="machine-readable output")
    recipes.set_defaults(func=_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
