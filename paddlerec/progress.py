"""Progress bars for long work: shown on a terminal, off otherwise or when asked (the log lines stay).

While a bar is on screen, the root logger's console handler writes through tqdm, so log
lines appear above the bar instead of being cut by it.
"""

import os
import sys
from contextlib import ExitStack


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Bar:
    """A tqdm bar plus the logging redirect, undone together on close."""

    def __init__(self, **options):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._stack = ExitStack()
        self._stack.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        self._bar = tqdm(**options)
        self._stack.callback(self._bar.close)  # runs before the redirect is undone

    def update(self, n=1):
        self._bar.update(n)

    def set_postfix_str(self, text, refresh=True):
        self._bar.set_postfix_str(text, refresh=refresh)

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def shows_progress(enabled, stream=None):
    """Whether a bar would be drawn: asked for, and the stream is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(enabled) and hasattr(stream, "isatty") and stream.isatty()


def progress_bar(enabled, total=None, desc="", unit="it", unit_scale=False):
    """A tqdm bar on stderr when `enabled` and stderr is a terminal, else an object that does nothing.

    unit_scale=True shows k/M prefixes (e.g. bytes of a download: unit="B").
    """
    if not shows_progress(enabled):
        return _Silent()
    # tqdm draws nothing on a terminal that reports a 0 x 0 size (e.g. a pty nobody sized)
    sized = _columns(sys.stderr) > 0
    size = {} if sized else {"ncols": 100, "nrows": 24}
    return _Bar(total=total, desc=desc, unit=unit, unit_scale=unit_scale, unit_divisor=1024 if unit == "B" else 1000,
                leave=False, dynamic_ncols=sized, file=sys.stderr, **size)


def _columns(stream):
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0
