"""``moesaic data status|install``: the Debian packages the recipes and tests read."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moesaic.cli.common import friendly_errors
from moesaic.data.debian import DATA_PACKAGES, TEST_PACKAGES, install, install_line, missing

__all__ = ["main"]


@friendly_errors("moesaic data")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moesaic data",
        description="The Debian packages moesaic's corpora, datasets and tests read (nothing is "
        "downloaded from a hub).",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("status", help="list the packages, what needs each, and which are installed")
    inst = sub.add_parser("install", help="apt-get install the missing packages")
    inst.add_argument("--yes", action="store_true", help="install without asking")
    inst.add_argument(
        "--print", action="store_true", help="only print the apt-get line for the missing ones"
    )
    inst.add_argument(
        "--data-only", action="store_true", help="the data packages only (not the test browser)"
    )
    args = parser.parse_args(argv)
    if args.action == "status":
        for package, why in TEST_PACKAGES.items():
            state = "missing" if missing([package]) else "installed"
            print(f"{package:<24} {state:<10} {why}")
        return 0
    wanted = list(DATA_PACKAGES if args.data_only else TEST_PACKAGES)
    todo = missing(wanted)
    if not todo:
        print(f"all {len(wanted)} Debian packages are installed")
        return 0
    if args.print:
        print(install_line(todo))
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            parser.error(f"{len(todo)} packages to install; pass --yes: {install_line(todo)}")
        answer = input(f"install {len(todo)} Debian packages ({' '.join(todo)})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing installed")
            return 1
    code = install(todo)
    if code:
        print(f"moesaic data: error: apt-get exited {code}", file=sys.stderr)
        return 1
    still = missing(todo)
    if still:
        print(
            f"moesaic data: error: still missing after apt-get: {' '.join(still)}", file=sys.stderr
        )
        return 1
    print(f"installed {len(todo)} Debian packages")
    return 0
