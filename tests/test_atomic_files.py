"""Atomic writes (paddlerec/files.py): a failed write leaves the old file and no temporary,
whichever step fails; temporaries a killed process left are removed by the next write.

Issue 13, class 1: cleanup was skipped when close() itself failed on a full disk, and a killed
run's `curves.png.tmp-NNNN.png` stayed in the checkpoint folder.
"""

import builtins
import errno
import os
import subprocess

import pytest

from paddlerec import curves, files
from paddlerec.run import main
from tests.helpers import PYTHON, checkpoint_epochs, leftovers, make_workspace


def disk_full():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def dead_pid():
    """The pid of a process that has ended."""
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


class _Stream:
    """A real file whose write or close fails as on a full disk."""

    def __init__(self, handle, fail_on):
        self._handle, self._fail_on = handle, fail_on

    def write(self, data):
        if self._fail_on == "write":
            self._handle.write(data[:3])  # what fit
            raise disk_full()
        return self._handle.write(data)

    def close(self):
        self._handle.close()  # the descriptor is gone either way, as with a real failing close()
        if self._fail_on == "close":
            raise disk_full()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __getattr__(self, name):
        return getattr(self._handle, name)


def failing_open(monkeypatch, fail_on):
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _Stream(handle, fail_on) if "w" in mode else handle

    monkeypatch.setattr(builtins, "open", fake_open)


def failing_fsync(monkeypatch):
    def fsync(fd):
        raise disk_full()

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("failure", ["write", "close", "fsync", "caller"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, failure):
    target = tmp_path / "out" / "result.txt"
    target.parent.mkdir()
    target.write_text("old\n")
    if failure in ("write", "close"):
        failing_open(monkeypatch, failure)
    elif failure == "fsync":
        failing_fsync(monkeypatch)
    with pytest.raises((OSError, ValueError)):
        with files.atomic_file(str(target)) as stream:
            stream.write("new contents\n")
            if failure == "caller":
                raise ValueError("the caller's own bug")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert os.listdir(target.parent) == ["result.txt"]


@pytest.mark.parametrize("failure", ["close", "fsync", "fill"])
def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temporary(tmp_path, monkeypatch, failure):
    root = tmp_path / "ckpt"
    files.atomic_folder(str(root), "1", lambda tmp: files.write_text(os.path.join(tmp, "meta.json"), "{}"))

    def fill(tmp):
        with open(os.path.join(tmp, "model.pdparams"), "w") as f:
            f.write("x" * 100)
        if failure == "fill":
            raise disk_full()

    if failure == "close":
        failing_open(monkeypatch, "close")
    elif failure == "fsync":
        failing_fsync(monkeypatch)
    with pytest.raises(OSError):
        files.atomic_folder(str(root), "1", fill)
    monkeypatch.undo()
    assert sorted(os.listdir(root)) == ["1"]
    assert os.listdir(root / "1") == ["meta.json"]


def test_a_failed_curves_plot_leaves_the_old_png_and_no_temporary(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    history = curves.History(str(tmp_path))
    history.add({"epoch": 1, "loss": 1.0, "events": 10, "seconds": 1.0, "events_per_s": 10.0})
    png = (tmp_path / curves.PNG).read_bytes()
    import matplotlib.figure

    def savefig(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG partial")
        raise disk_full()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError):
        history.add({"epoch": 2, "loss": 0.5, "events": 10, "seconds": 1.0, "events_per_s": 10.0})
    assert (tmp_path / curves.PNG).read_bytes() == png
    assert not leftovers(tmp_path)


def test_temporaries_of_killed_processes_are_removed_by_the_next_write(tmp_path):
    gone = dead_pid()
    left = [f".curves.tmp-{gone}.png", f"curves.png.tmp-{gone}.png", f".status.0.tmp-{gone}.json",
            f"status.0.json.tmp-{gone}", f".1.tmp-{gone}.txt"]
    for name in left:
        (tmp_path / name).write_text("half")
    (tmp_path / f".tmp-3-{gone}").mkdir()
    (tmp_path / f".tmp-3-{gone}" / "model.pdparams").write_text("half")
    alive = f".curves.tmp-{os.getppid()}.png"  # the process that started pytest is running
    (tmp_path / alive).write_text("being written")
    (tmp_path / "notes.txt").write_text("a user's file")
    files.write_text(str(tmp_path / "curves.csv"), "epoch\n")
    assert sorted(os.listdir(tmp_path)) == sorted([alive, "curves.csv", "notes.txt"])


def test_a_run_after_a_killed_one_leaves_no_temporary_in_the_checkpoint_folder(tmp_path, capsys):
    """What a run killed inside a save leaves (a half checkpoint folder, half curves) is gone
    after the next run into the same folder, and never read as a checkpoint meanwhile."""
    path = make_workspace(tmp_path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    gone = dead_pid()
    (ckpt / f".tmp-7-{gone}").mkdir()
    (ckpt / f".tmp-7-{gone}" / "model.pdparams").write_text("half")
    for name in (f".curves.tmp-{gone}.png", f"curves.png.tmp-{gone}.png", f".curves.tmp-{gone}.json"):
        (ckpt / name).write_text("half")
    assert main(["-m", path, "--no-progress", "-q", "-o", "runner.train.epochs=1"]) == 0
    assert checkpoint_epochs(ckpt) == [1]
    assert not leftovers(ckpt), leftovers(ckpt)
