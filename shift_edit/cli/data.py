"""``shift-edit data``: where data sets are found, and downloading the public ones (sha256-checked)."""

from __future__ import annotations

import argparse

from ..core.errors import ShiftEditError
from ..files.data_files import DATA_FILES, fetch_data, find_data, require_data, search_dirs

NAME = "data"
HELP = ("list data sets and where they are found; fetch the public ones ("
        + ", ".join(name for name, spec in DATA_FILES.items() if spec.url) + ")")
EPILOG = ("A data set is found, in order: the path given on the command line, $SHIFT_EDIT_DATA (a folder), "
          "the user cache (<cache>/data, $SHIFT_EDIT_CACHE overrides the cache). `fetch` downloads into the "
          "user cache (or --dest) and checks the sha256.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "fetch", "where"], help="list: every data set and where it was found; "
                   "fetch NAME: download it; where NAME: print its path (exit 2 if missing)")
    p.add_argument("name", nargs="?", choices=list(DATA_FILES), help="the data set (for fetch / where)")
    p.add_argument("--dest", default=None, metavar="DIR",
                   help="fetch: the data folder to store into (default: the user cache)")
    p.add_argument("--url", default=None, help="fetch: another source of the same bytes (a mirror or file:// copy)")
    p.add_argument("--force", action="store_true", help="fetch: download even if a good copy is stored")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        print("searched: " + ", ".join(str(d) for d in search_dirs()))
        for name, spec in DATA_FILES.items():
            p = find_data(name)
            where = str(p) if p else ("missing: shift-edit data fetch " + name if spec.url else "missing (no public "
                                      "download)")
            print(f"{name:20s} {where}\n{'':20s} {spec.description}")
        return 0
    if args.name is None:
        raise ShiftEditError(f"data {args.action} needs a data set name: {', '.join(DATA_FILES)}")
    if args.action == "where":
        print(require_data(args.name))
        return 0
    path = fetch_data(args.name, args.dest, url=args.url, force=args.force)
    print(f"{args.name}: {path} (sha256 checked)")
    return 0
