"""Writing files and folders so that no reader ever sees half of one.

Everything is written under a hidden temporary name next to its target (a name starting with
'.', which the readers skip: see rsc15_reader.list_data_files and checkpoint.list_checkpoints)
and renamed over the target only once complete. The temporary is removed whatever happens —
an exception in the caller's code, a full disk, or close() itself failing (a full disk often
shows only there) — so a failed write leaves neither a half file nor a stray temporary.

Only the standard library: the data/ scripts use this module and must start fast.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import ExitStack, contextmanager

from .errors import SaveError

log = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temporary_name(path):
    """The hidden sibling `path` is written as: `dir/.<stem>.tmp-<pid><ext>` (the extension is
    kept last: matplotlib picks the image format from it)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")


# what temporary_name makes (and its unhidden form `curves.png.tmp-1234.png` of earlier versions),
# and what the data scripts wrote before they used this module (`train.txt.tmp1234`): either way
# the pid of the writer is in the name
_TEMPORARY = re.compile(r"^\.?(?P<stem>.*)\.tmp-(?P<pid>\d+)(?P<ext>\.[^.]*)?$")
_LEGACY_TEMPORARY = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def stale_temporary(name):
    """True when `name` is a temporary (this module's or a legacy one) whose writer is gone."""
    match = _TEMPORARY.match(name) or _LEGACY_TEMPORARY.match(name)
    return bool(match) and not _alive(int(match.group("pid")))


def looks_temporary(name):
    """True for a name a writer uses while a file is incomplete (whether or not the writer still runs)."""
    return bool(_TEMPORARY.match(name) or _LEGACY_TEMPORARY.match(name))


def remove_stale_temporaries(folder):
    """Delete the temporary files that killed writers left in `folder` (a kill skips every cleanup);
    those of running writers are left alone. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if stale_temporary(name) and os.path.isfile(path) and not os.path.islink(path):
            _remove(path)
            removed.append(name)
    if removed:
        log.info("removed %d temporary file(s) left in %s by an interrupted run: %s", len(removed), folder,
                 ", ".join(sorted(removed)))
    return removed


def _remove(path):
    try:
        os.remove(path)
    except (FileNotFoundError, NotADirectoryError):  # never created
        pass
    except OSError as exc:  # raising here would hide the error that brought us here
        log.warning("cannot remove the temporary file %s: %s", path, exc.strerror or exc)


@contextmanager
def atomic_paths(*paths):
    """Yield one temporary path per target; when the block ends without an exception each is
    renamed over its target (in order), else nothing is. The temporaries never outlive the block."""
    temps = [temporary_name(path) for path in paths]
    try:
        for path in paths:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for folder in sorted({os.path.dirname(path) or "." for path in paths}):
            remove_stale_temporaries(folder)
        yield temps
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    finally:
        for temp in temps:
            _remove(temp)


@contextmanager
def atomic_files(*paths, mode="w", encoding="utf-8", newline=None):
    """Like atomic_paths, yielding the temporaries opened with `mode`; they are closed (and a
    failing close() counts as a failed write) before anything is renamed."""
    text = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    with atomic_paths(*paths) as temps, ExitStack() as streams:
        yield [streams.enter_context(open(temp, mode, **text)) for temp in temps]


@contextmanager
def atomic_file(path, mode="w", encoding="utf-8", newline=None):
    with atomic_files(path, mode=mode, encoding=encoding, newline=newline) as (stream,):
        yield stream


def write_text(path, text):
    with atomic_file(path) as stream:
        stream.write(text)


def write_json(path, value):
    write_text(path, json.dumps(value, indent=1, sort_keys=True))


def file_digest(path):
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_folder(root, name, fill):
    """Create `<root>/<name>/` by calling fill(temporary folder), syncing its files and renaming
    it into place; an existing `<root>/<name>/` is replaced. Returns the final path; raises OSError.

    The temporary folder is `<root>/.tmp-<name>-<pid>`; a process killed while replacing leaves
    `<root>/.old-<name>-<pid>`. Neither is ever read as a `<name>` folder; the next save of the
    same name removes what an interrupted one left."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    try:
        _remove_leftovers(root, name, "tmp")
        os.makedirs(tmp)
        fill(tmp)
        for entry in os.listdir(tmp):
            path = os.path.join(tmp, entry)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        final = os.path.join(root, name)
        old = None
        if os.path.exists(final):
            old = os.path.join(root, f".old-{name}-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        _remove_leftovers(root, name, "old")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already renamed away unless something failed


def _remove_leftovers(root, name, kind):
    for entry in os.listdir(root):
        if entry.startswith(f".{kind}-{name}-"):
            log.info("removing %s, left by an interrupted save", os.path.join(root, entry))
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def save_error(what, exc, consequence=""):
    """The SaveError for an OSError met while writing `what`: says to free disk space when full."""
    hint = "free some disk space" if exc.errno in DISK_FULL else "check the path and its permissions"
    return SaveError(f"cannot write {what}: {exc.strerror or exc}; {hint}{consequence}")
