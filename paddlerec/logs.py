"""Where a run's output goes: results on stdout, the log on stderr.

Results (metrics tables, recommendations, the end-of-run summary) are logged through
`results` (logger "paddlerec.results"); everything else — progress, diagnostics, warnings —
through the module's own logger. `configure` (called once by an entry point) sends results to
stdout as plain lines and every other record to stderr as `HH:MM:SS LEVEL message`, so
`| tee` and `| grep` capture the results alone; `log_file` also writes both, in that format, to
one file. Without `configure` (a library caller, a test) results simply propagate to the root
logger like any record.

A process that relays another's log (the distributed launcher reading its workers' output)
reads the lines back with `parse_line`, which follows the same two constants.
"""

import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


RESULTS = "paddlerec.results"
results = logging.getLogger(RESULTS)


def configure(quiet=False, log_file=None):
    """Log INFO and above (WARNING and above when quiet) to stderr in FORMAT, results to stdout
    (even when quiet: they are what the run is for), and both to log_file when given.

    When the process already has logging handlers of its own (pytest, an application calling
    main()), those stay in charge: results reach them through the root logger, and only the
    log file is added. Calling it again replaces what an earlier call set up."""
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    root = logging.getLogger()
    for logger in (root, results):
        for handler in list(logger.handlers):
            if getattr(handler, "_paddlerec", False):
                logger.removeHandler(handler)
                handler.close()
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    results.setLevel(logging.INFO)
    handlers = []
    if log_file:
        shared = logging.FileHandler(log_file, encoding="utf-8")
        shared.setFormatter(formatter)
        handlers.append((root, shared))
    embedded = bool(root.handlers)
    results.propagate = embedded
    if not embedded:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(formatter)
        stdout = logging.StreamHandler(sys.stdout)
        stdout.setFormatter(logging.Formatter("%(message)s"))
        handlers += [(root, stderr), (results, stdout)] + ([(results, handlers[0][1])] if log_file else [])
    for logger, handler in handlers:
        handler._paddlerec = True
        logger.addHandler(handler)


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
