"""``python -m evomerge.zoo [--force] [--dir DIR]``: build (or find) the demo zoo and print its folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.zoo import build_zoo, default_zoo_dir


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m evomerge.zoo", description=__doc__)
    ap.add_argument("--dir", type=Path, default=None, help=f"zoo root (default {default_zoo_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = ap.parse_args()
    print(build_zoo(args.dir, force=args.force))


if __name__ == "__main__":
    main()
