"""Progress bars for long work: shown on a terminal, silent otherwise (the log lines stay)."""

import sys


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


def progress_bar(enabled, total=None, desc="", unit="it"):
    """A tqdm bar when `enabled` and stderr is a terminal, else an object that does nothing."""
    if not enabled or not sys.stderr.isatty():
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
