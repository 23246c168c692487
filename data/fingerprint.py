"""Print what a file holds, for data_prepare.sh to decide whether a step is up to date.

    python data/fingerprint.py PATH... [-- PATH...]

One line per PATH: ``<bytes> <sha256> <PATH>``, or ``missing <PATH>`` when it is not a regular
file; ``--`` is echoed as it is (data_prepare.sh separates a step's outputs from its inputs
with it). The content, not the modification time, decides: ``cp -p``, ``rsync -a``, tar and
7z all give a replaced file an older mtime than the outputs made from its predecessor.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data/ is not a package
import cli_common  # noqa: E402,F401  (puts the repository root on sys.path)
from paddlerec.files import file_digest  # noqa: E402


def fingerprint_line(path: str) -> str:
    if path == "--":
        return path
    if not os.path.isfile(path):
        return f"missing {path}"
    digest = file_digest(path)
    return f"{digest['bytes']} {digest['sha256']} {path}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    try:
        for path in argv:
            print(fingerprint_line(path))
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
