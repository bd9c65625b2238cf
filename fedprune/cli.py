"""Command line: `fedprune run [CONFIG] [key=value ...]`, `fedprune partition-report`.

Configs are validated before any work starts; a bad key or value exits with status 2
and a message naming the key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _split(args: list[str]) -> tuple[str, list[str]]:
    """First positional without '=' is the config name; the rest are overrides."""
    name, overrides = "default", []
    for i, item in enumerate(args):
        if i == 0 and "=" not in item:
            name = item
        else:
            overrides.append(item)
    return name, overrides


def cmd_run(args: argparse.Namespace) -> int:
    name, overrides = _split(args.items)
    cfg = load_config(name, overrides)
    from .fl.rundir import new_run_dir

    run_dir = new_run_dir(cfg, name)
    print(f"[fedprune] config {name!r}, writing to {run_dir}", flush=True)
    from server.simulate import simulate  # Flower only from here on

    simulate(cfg, run_dir)
    return 0


def cmd_partition_report(args: argparse.Namespace) -> int:
    name, overrides = _split(args.items)
    cfg = load_config(name, overrides)
    from .data import partition_report

    out = Path(args.out)
    result = partition_report(cfg.data, out)
    print((out / "partition.md").read_text())
    print(f"[fedprune] wrote {', '.join(str(v) for v in result.get('paths', {}).values())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment as a Flower simulation")
    run.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                     help="config name in experiments/configs/ or a YAML path "
                          "(default: 'default'), then key=value overrides")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("partition-report",
                         help="per-client sizes and label histograms of a config's partition")
    rep.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    rep.add_argument("--out", default="runs/partition-report", help="output folder")
    rep.set_defaults(func=cmd_partition_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fedprune: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
