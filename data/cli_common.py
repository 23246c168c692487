"""What the data/ scripts share: their error type and their argument parser.

The scripts run as `python data/<script>.py` (data/ is not a package), so each puts this
folder on sys.path before importing this module; this module puts the repository root there,
so that they write files through paddlerec/files.py and read YAML through paddlerec/yamlfile.py
(both standard library plus PyYAML only: nothing heavy is imported).
"""

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)


class DataError(Exception):
    """Bad input or usage: main() prints it as one ``error:`` line, exit 2."""

    def __init__(self, what: str, path: str | None = None, line: int | None = None, hint: str | None = None):
        super().__init__(what)
        self.what, self.path, self.line, self.hint = what, path, line, hint

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f", {self.path}" + (f":{self.line}" if self.line else "")
        return self.what + where + (f"; {self.hint}" if self.hint else "")


class UsageParser(argparse.ArgumentParser):
    """argparse whose usage errors are the project's one ``error:`` line (exit 2)."""

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def run_main(main) -> int:
    """main()'s exit code; SIGTERM (like Ctrl-C) unwinds through the scripts' atomic writers, so
    their temporaries are removed, and ends in one line and exit code 143 (130 for Ctrl-C)."""
    from paddlerec.termination import Terminated, sigterm_raises

    try:
        with sigterm_raises():
            return main()
    except Terminated:
        print("terminated (SIGTERM); no output was left half-written", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was left half-written", file=sys.stderr)
        return 130
