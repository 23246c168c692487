"""SIGTERM ends a run the way Ctrl-C does: through the program's own cleanup, not mid-write.

Paddle installs C++ signal handlers when it is imported, and on SIGTERM prints a C++ stack
and dies wherever it is. `sigterm_raises()` puts a Python handler in their place (call it
after importing Paddle) that raises `Terminated`: a BaseException, so no `except Exception`
on the way swallows it, and every `finally` runs — the atomic writers of paddlerec/files.py
and paddlerec/checkpoint.py remove their temporaries, and nothing appears half-written.
The entry point turns it into one line and exit code 143 (128 + SIGTERM), as shells report.

Only the standard library: the data/ scripts use this module too.
"""

import signal
import threading
from contextlib import contextmanager

EXIT_CODE = 128 + signal.SIGTERM  # 143


class Terminated(BaseException):
    """The process received SIGTERM."""

    exit_code = EXIT_CODE


_received = False  # SIGTERM arrived within sigterm_raises()


def _raise_terminated(signum, frame):
    global _received
    _received = True
    # a second SIGTERM while the first unwinds must not interrupt the cleanup it runs
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def check():
    """Raise Terminated if SIGTERM arrived. The handler raises wherever Python happens to be, and
    where that is a weakref callback or a __del__ (matplotlib drawing the curves, say) Python
    prints "Exception ignored" and carries on: the loops call this between batches so such a
    signal still ends the run."""
    if _received:
        raise Terminated()


@contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises Terminated in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _received
    _received = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        _received = False  # check() raises only within the block
        # None: the previous handler was not installed from Python (Paddle's); the default is what
        # a Python program expects after the block
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def newest_checkpoints(config):
    """'<path>' of the newest complete checkpoint under each save_checkpoint_path of the runners in
    `mode`, for the line printed when a run stops early; 'none yet' when there is none."""
    from .checkpoint import list_checkpoints

    found = []
    for name in config.mode:
        root = config.runners[name].get("save_checkpoint_path")
        if root:
            checkpoints = list_checkpoints(root)
            if checkpoints and checkpoints[-1][1] not in found:
                found.append(checkpoints[-1][1])
    return ", ".join(found) or "none yet"
