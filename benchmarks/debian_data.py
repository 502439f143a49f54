"""Debian packages as test and benchmark data, downloaded (`apt-get download`), never installed, and
unpacked (`dpkg -x`) under the data root: $SIMSEARCH_DATA, else ~/.cache/simsearch-data (`make
test-deps` puts the .debs the tests need into <data root>/debs). The benchmarks import it as a
script helper; the tests find it on the path tests/conftest.py adds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from simsearch.errors import SimsearchError

GRAF_FILES = ("graf1.png", "graf3.png", "H1to3p.xml")  # opencv-doc: simsearch.bench.fixtures.build_graf reads them
GRAF_SUBDIR = Path("usr/share/doc/opencv-doc/examples/data")  # inside the Debian package
# Cut-out photos with an alpha channel: the co-segmentation ground truth (simsearch.bench.fixtures.composite_set)
STAMPS_PACKAGE = "tuxpaint-stamps-default"
STAMPS = Path("usr/share/tuxpaint/stamps")


def data_root() -> Path:
    """Where downloaded Debian packages and the data built from them are kept."""
    return Path(os.environ.get("SIMSEARCH_DATA") or Path.home() / ".cache" / "simsearch-data")


def debian_package(package: str, root: str | Path | None = None, download: bool = True) -> Path:
    """The unpacked tree of a Debian package under the data root (`pkgs/<package>`), unpacking
    `debs/<package>_*.deb` with `dpkg -x` and, when allowed, downloading it first (`apt-get download`, no
    install). SimsearchError when it cannot be had."""
    root = Path(root) if root is not None else data_root()
    tree, debs = root / "pkgs" / package, root / "debs"
    if tree.is_dir():
        return tree
    debs.mkdir(parents=True, exist_ok=True)

    def run(*cmd: str, cwd: Path | None = None) -> None:
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd)

    if not list(debs.glob(f"{package}_*.deb")):
        if not download:
            raise SimsearchError(f"{debs}: no {package}_*.deb (apt-get download {package}, or `make test-deps`)")
        try:
            run("apt-get", "download", package, cwd=debs)
        except (subprocess.CalledProcessError, FileNotFoundError):
            try:  # stale or empty package lists: refresh once and retry
                run("apt-get", "update")
                run("apt-get", "download", package, cwd=debs)
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                raise SimsearchError(f"cannot fetch Debian package {package} ({getattr(e, 'stderr', e)}); "
                                     f"put {package}_*.deb into {debs} by hand") from None
    deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=tree.parent))
    run("dpkg", "-x", str(deb), str(tmp))
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(tree)  # appears whole or not at all
    return tree


# -- opencv-doc's graf pair ----------------------------------------------------------------------------
def _graf_dir_candidates() -> list[Path]:
    env = os.environ.get("SIMSEARCH_GRAF_DIR")
    return [*([Path(env)] if env else []), data_root() / "pkgs" / "opencv-doc" / GRAF_SUBDIR, Path("/") / GRAF_SUBDIR]


def find_graf_data(extract_to: str | Path | None = None) -> Path | None:
    """The folder holding graf1.png, graf3.png and H1to3p.xml, or None.

    Looks in $SIMSEARCH_GRAF_DIR, the unpacked package under the data root
    (<data root>/pkgs/opencv-doc/...) and an installed opencv-doc (/usr/share/doc/...). Failing
    those, if `extract_to` is given and a downloaded opencv-doc_*.deb lies in <data root>/debs, only
    the three files are extracted from it into `extract_to` (no network, a few seconds).
    """
    for d in _graf_dir_candidates():
        if all((d / f).is_file() for f in GRAF_FILES):
            return d
    debs = sorted((data_root() / "debs").glob("opencv-doc_*.deb"))
    if extract_to is None or not debs or not shutil.which("dpkg-deb") or not shutil.which("tar"):
        return None
    extract_to = Path(extract_to)
    extract_to.mkdir(parents=True, exist_ok=True)
    members = [f"./{GRAF_SUBDIR / f}" for f in GRAF_FILES]
    deb = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(extract_to), *members], stdin=deb.stdout, capture_output=True)
    deb.stdout.close()
    deb.wait()
    d = extract_to / GRAF_SUBDIR
    return d if tar.returncode == 0 and all((d / f).is_file() for f in GRAF_FILES) else None


def graf_missing_reason() -> str:
    looked = ", ".join(str(d) for d in _graf_dir_candidates())
    return (f"opencv-doc's graf1.png/graf3.png/H1to3p.xml not found (looked in {looked} and for "
            f"{data_root() / 'debs'}/opencv-doc_*.deb): put the Debian package there "
            f"(`apt-get download opencv-doc`; in the repository `make test-deps` does it) or set SIMSEARCH_GRAF_DIR")


# -- tuxpaint stamps -------------------------------------------------------------------------------------
def stamps_dir() -> Path | None:
    """The unpacked stamps folder, unpacking a downloaded .deb if that is all there is; None when
    neither is there (this never downloads)."""
    try:
        return debian_package(STAMPS_PACKAGE, download=False) / STAMPS
    except SimsearchError:
        return None
