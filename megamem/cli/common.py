"""Argument helpers shared by subcommands that read a config."""
from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, merged in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key after the files, e.g. --set model.tau=8 (repeatable)")


def config_from_args(args: argparse.Namespace):
    from megamem.config import load_config

    return load_config(args.configs, args.overrides)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M': the precision a reader compares at a glance."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()
