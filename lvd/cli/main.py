"""The `lvd` command line.

Each sub-command lives in its own module under `lvd.cli`; a module exposes
`register(subparsers)` which adds its parser and sets `func` (a callable taking the parsed
`argparse.Namespace` and returning an exit code). Heavy imports (torch, ray, prefect) happen
inside `func`, so `lvd --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in `lvd --help`.
COMMAND_MODULES = (
    "demo",
    "pipeline",
    "curate",
    "verify",
    "pretrain",
    "eval",
    "export",
    "embed",
    "index",
    "search",
    "viz",
    "segment",
    "probe",
)


class Parser(argparse.ArgumentParser):
    """Bad usage is one `error:` line on stderr (which command, where its help is) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lvd",
        description="Curate web-scraped image dumps LVD-142M-style and pretrain DINOv2 on them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"lvd.cli.{name}")
        module.register(sub)
    return parser


# Commands that start Ray or Prefect processes -> whether they run the curate/pipeline flows.
# From the command line (argv None) their processes die with them and a flow run a killed
# one left RUNNING is marked Crashed on the next start (lvd.flows.watchdog).
WATCHED = {"demo": True, "pipeline": True, "curate": True, "pretrain": False, "embed": False}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Commands that start Ray or Prefect check their arguments first (`check`: prints one
    # `error:` line and returns the exit code), so a bad call fails at once and creates nothing.
    if (check := getattr(args, "check", None)) is not None and (code := check(args)):
        return code
    if argv is None and args.command in WATCHED:
        from lvd.flows import watchdog

        out = getattr(args, "out", None)
        watchdog.protect(args.command, str(out) if out else None, flows=WATCHED[args.command])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
