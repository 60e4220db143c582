"""``python -m evomerge.zoo [--force] [--dir DIR] [--version N]``: build (or find) the demo zoo and print its folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.zoo import RECIPES, ZOO_VERSION, build_zoo, default_zoo_dir


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m evomerge.zoo", description=__doc__)
    ap.add_argument("--dir", type=Path, default=None, help=f"zoo root (default {default_zoo_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    ap.add_argument("--version", type=int, default=ZOO_VERSION, choices=sorted(RECIPES),
                    help=f"zoo version (default {ZOO_VERSION})")
    args = ap.parse_args()
    print(build_zoo(args.dir, force=args.force, version=args.version))


if __name__ == "__main__":
    main()
