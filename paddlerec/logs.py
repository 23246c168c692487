"""The log line format of every process of a run: `HH:MM:SS LEVEL message` on stderr.

Library code only logs (`logging.getLogger(__name__)`); entry points call `configure` once.
A process that relays another's log (the distributed launcher reading its workers' output)
reads the lines back with `parse_line`, which follows the same two constants.
"""

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


def configure(quiet=False):
    """Log INFO and above (WARNING and above when quiet) to stderr in FORMAT."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=FORMAT, datefmt=DATE_FORMAT,
                        stream=sys.stderr)


def parse_line(line):
    """(level number, message) of a line written in FORMAT, or None for any other line (a
    traceback, a library's own print)."""
    parts = line.rstrip("\r\n").split(" ", 2)
    if len(parts) != 3:
        return None
    stamp, level_name, message = parts
    level = logging.getLevelName(level_name)  # a number for a level's name, a string otherwise
    if not isinstance(level, int):
        return None
    try:
        time.strptime(stamp, DATE_FORMAT)
    except ValueError:
        return None
    return level, message
