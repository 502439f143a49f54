"""Write the small SPair-71k-layout keypoint fixtures (tests/spair_fixture.py) to a folder.

    python benchmarks/make_spair_fixture.py [OUT] [--no-graf] [--data-root DIR]

OUT (default /tmp/simsearch-spair) gets two SPair roots, each usable with `simsearch bench pck`:

    OUT/translation   overlapping crops of examples/images photos with a known offset (4 categories,
                      8 pairs, 25 keypoints per pair)
    OUT/graf          opencv-doc's graf1 -> graf3 with the ground-truth homography H1to3p (1 pair)

The graf pair needs the Debian package opencv-doc: if its files are not found (see
spair_fixture.find_graf_data), it is fetched with `apt-get download opencv-doc` and unpacked with
`dpkg -x` into <data root>/pkgs/opencv-doc (data root: $SIMSEARCH_DATA or ~/.cache/simsearch-data, the
same cache as benchmarks/data.py), after which the tests find it too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import spair_fixture as sf  # noqa: E402


def graf_dir(allow_fetch: bool = True) -> Path | None:
    found = sf.find_graf_data()
    if found or not allow_fetch:
        return found
    from data import fetch  # benchmarks/data.py: apt-get download + dpkg -x into <root>/pkgs

    fetch(sf.data_root(), "opencv-doc")
    return sf.find_graf_data()


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
    graf = None
    if not args.no_graf:
        graf = graf_dir(allow_fetch=not args.no_fetch)
        if graf is None:
            sys.exit(sf.graf_missing_reason())
    roots = sf.build_all(args.out, graf)
    for name, root in roots.items():
        pairs = sorted((root / "PairAnnotation" / "test").glob("*.json"))
        print(f"{name}: {root} ({len(pairs)} pairs)")
        print(f"  simsearch bench pck {root} --json")


if __name__ == "__main__":
    main()
