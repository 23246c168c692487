"""Writing files and folders so that no reader ever sees half of one.

Everything is written under a hidden temporary name next to its target (a name starting with
'.', which the readers skip: see rsc15_reader.list_data_files and checkpoint.list_checkpoints)
and renamed over the target only once complete and synced. The temporary is removed whatever
happens — an exception in the caller's code, a full disk, or close()/fsync() itself failing
(a full disk often shows only there) — so a failed write leaves neither a half file nor a
stray temporary. A process killed outright (SIGKILL, power loss) cannot clean up: its
temporaries carry its pid, and the next write next to them removes those whose process is
gone (`remove_stale_temporaries`).

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

# `.<stem>.tmp-<pid><ext>` (a file; also the unhidden `<name>.tmp-<pid>[<ext>]` earlier versions
# wrote) and `.tmp-<name>-<pid>` (a folder): the pid tells a live writer's temporary from one a
# killed process left
_TEMP_FILE = re.compile(r"^.+\.tmp-(\d+)(\.[A-Za-z0-9]+)?$")
_TEMP_FOLDER = re.compile(r"^\.tmp-.+-(\d+)$")
# what the data scripts wrote before they used this module: `train.txt.tmp1234`
_LEGACY_TEMP_FILE = re.compile(r"^.+\.tmp(\d+)$")


def looks_temporary(name):
    """True for a file name a writer uses while the file is incomplete, whether or not the writer
    still runs (a reader must never load one: rsc15_reader skips them)."""
    return bool(_TEMP_FILE.match(name) or _LEGACY_TEMP_FILE.match(name))


def temporary_name(path):
    """The hidden sibling `path` is written as: `dir/.<stem>.tmp-<pid><ext>` (the extension is
    kept last: matplotlib picks the image format from it)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}{ext}")


def _process_is_gone(pid):
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def remove_stale_temporaries(folder):
    """Remove the temporary files and folders that killed processes left in `folder` (those of a
    process still running are its business). Returns the names removed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _TEMP_FILE.match(name) or _LEGACY_TEMP_FILE.match(name) or _TEMP_FOLDER.match(name)
        if not match or not _process_is_gone(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        log.info("removing %s, left by an interrupted write", path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove(path)
        removed.append(name)
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
    synced and renamed over its target (in order), else nothing is. The temporaries never
    outlive the block."""
    temps = [temporary_name(path) for path in paths]
    try:
        for folder in sorted({os.path.dirname(path) or "." for path in paths}):
            os.makedirs(folder, exist_ok=True)
            remove_stale_temporaries(folder)
        yield temps
        for temp in temps:
            _fsync_file(temp)
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


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    """Make a rename in `path` durable; file systems that cannot sync a folder are left as they are."""
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
    `<root>/.old-<name>-<pid>`. Neither is ever read as a `<name>` folder; the next save next
    to them removes the temporaries of processes that are gone, and the `.old-<name>-` copies
    once `<name>` is in place again."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    try:
        remove_stale_temporaries(root)
        os.makedirs(tmp)
        fill(tmp)
        for entry in os.listdir(tmp):
            path = os.path.join(tmp, entry)
            if os.path.isfile(path):
                _fsync_file(path)
        final = os.path.join(root, name)
        old = None
        if os.path.exists(final):
            old = os.path.join(root, f".old-{name}-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        _remove_old_copies(root, name)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already renamed away unless something failed


def _remove_old_copies(root, name):
    for entry in os.listdir(root):
        if entry.startswith(f".old-{name}-"):
            log.info("removing %s, left by an interrupted save", os.path.join(root, entry))
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def save_error(what, exc, consequence=""):
    """The SaveError for an OSError met while writing `what`: says to free disk space when full."""
    hint = "free some disk space" if exc.errno in DISK_FULL else "check the path and its permissions"
    return SaveError(f"cannot write {what}: {exc.strerror or exc}; {hint}{consequence}")
