"""Write the small SPair-71k-layout keypoint fixtures (simsearch.bench.fixtures) to a folder.

    python benchmarks/make_spair_fixture.py [OUT] [--no-graf] [--no-fetch] [--data-root DIR]

OUT (default /tmp/simsearch-spair) gets two SPair roots, each usable with `simsearch bench pck`:

    OUT/translation   overlapping crops of examples/images photos with a known offset (4 categories,
                      8 pairs, 25 keypoints per pair)
    OUT/graf          opencv-doc's graf1 -> graf3 with the ground-truth homography H1to3p (1 pair)

The graf pair needs the Debian package opencv-doc: if its files are not found (see
benchmarks/debian_data.find_graf_data), it is fetched with `apt-get download opencv-doc` and
unpacked with `dpkg -x` into <data root>/pkgs/opencv-doc (data root: $SIMSEARCH_DATA or
~/.cache/simsearch-data, the same cache as benchmarks/data.py), after which the tests find it too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import debian_data
from common import EXAMPLES

from simsearch.bench import fixtures as fx


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("/tmp/simsearch-spair"))
    ap.add_argument("--no-graf", action="store_true", help="only the translation-crop fixture")
    ap.add_argument("--no-fetch", action="store_true", help="do not apt-get download opencv-doc")
    ap.add_argument("--data-root", type=Path, help="Debian package cache (default $SIMSEARCH_DATA or ~/.cache/simsearch-data)")
    args = ap.parse_args(argv)
    if args.data_root:
        os.environ["SIMSEARCH_DATA"] = str(args.data_root)
    for sub in ("translation", "graf"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    roots = {"translation": fx.build_translation(args.out / "translation", fx.example_offsets(EXAMPLES))}
    if not args.no_graf:
        graf = debian_data.find_graf_data()
        if graf is None and not args.no_fetch:
            debian_data.debian_package("opencv-doc")  # apt-get download + dpkg -x into <data root>/pkgs
            graf = debian_data.find_graf_data()
        if graf is None:
            sys.exit(debian_data.graf_missing_reason())
        roots["graf"] = fx.build_graf(args.out / "graf", graf)
    for name, root in roots.items():
        pairs = sorted((root / "PairAnnotation" / "test").glob("*.json"))
        print(f"{name}: {root} ({len(pairs)} pairs)")
        print(f"  simsearch bench pck {root} --json")


if __name__ == "__main__":
    main()
