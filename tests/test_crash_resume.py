"""Killed runs and diverging runs (issue 6): every checkpoint left behind loads, and
incremental training picks up from the newest complete one.

The kills are real (SIGKILL to a `python -m paddlerec.run` process): in the middle of an
epoch, in the middle of writing a checkpoint (held there by a hook around paddle.save, so
that the kill lands inside the save every time), and at a random moment. A NaN loss is
provoked for real with a huge learning rate, with both training kernels.
"""

import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from paddlerec.run import main
from tests.helpers import (PYTHON, REPO, assert_one_clean_error, checkpoint_epochs, leftovers,
                                  make_workspace, run_paddlerec)
from tests.test_bad_input import load_every_checkpoint

# long enough epochs to be killed inside one: 600 sessions, about 270 mini-batches of 8
LONG = 600
GUARD_SECONDS = 300  # a run that never reaches the awaited point fails instead of hanging CI


def start(args, cwd, script=None):
    """Start `python -m paddlerec.run ARGS` (or `python SCRIPT ARGS`); stderr lines go to a queue."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    command = [PYTHON, script] if script else [PYTHON, "-m", "paddlerec.run"]
    proc = subprocess.Popen(command + ["--no-progress"] + list(args), cwd=str(cwd), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_for(proc, lines, pattern, seen):
    """Read stderr lines until one matches `pattern`; returns the match (fails if the run ends first)."""
    deadline = time.monotonic() + GUARD_SECONDS
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            pytest.fail(f"the run ended (exit {proc.wait()}) before {pattern!r}:\n{''.join(seen)}")
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    sigkill(proc)
    pytest.fail(f"no {pattern!r} within the guard time:\n{''.join(seen)}")


def sigkill(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


def resume_and_check(folder, extra_epochs=2):
    """Incremental training from the checkpoint folder; it must continue from the newest complete
    checkpoint, finish, and leave only loadable checkpoints and no temporary folders."""
    ckpt = folder / "ckpt"
    before = checkpoint_epochs(ckpt)
    assert before, "the killed run should have finished at least one checkpoint"
    proc = run_paddlerec(["-m", str(folder), "-o", "mode=resume", "-o", f"runner.resume.epochs={extra_epochs}"])
    assert proc.returncode == 0, proc.stderr
    newest = before[-1]
    assert f"continuing from {ckpt / str(newest)} (epoch {newest})" in proc.stderr
    done = [int(n) for n in re.findall(r"epoch (\d+) done", proc.stderr)]
    assert done == list(range(newest + 1, newest + extra_epochs + 1))
    after = checkpoint_epochs(ckpt)
    assert after == sorted(set(before) | set(done))
    assert load_every_checkpoint(ckpt) == after
    assert not leftovers(ckpt), leftovers(ckpt)
    return after


@pytest.mark.slow
def test_sigkill_in_the_middle_of_an_epoch(tmp_path):
    make_workspace(tmp_path, n_train=LONG)
    proc, lines = start(["-m", str(tmp_path), "-o", "runner.train.epochs=50", "-o", "runner.train.print_interval=64"],
                        tmp_path)
    seen = []
    wait_for(proc, lines, r"saved checkpoint .*/1$", seen)
    wait_for(proc, lines, r"epoch 2 batch 128:", seen)  # well inside epoch 2
    assert sigkill(proc) == -signal.SIGKILL
    assert 1 in checkpoint_epochs(tmp_path / "ckpt")
    assert load_every_checkpoint(tmp_path / "ckpt") == checkpoint_epochs(tmp_path / "ckpt")
    resume_and_check(tmp_path, extra_epochs=1)


SLOW_SAVE = '''
"""paddlerec.run whose save of checkpoint 2 stops after its first file, until killed."""
import os, sys, time
import paddle

real_save = paddle.save


def save_then_hang(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if os.sep + ".tmp-2-" in str(path):
        with open(os.path.join(os.path.dirname(os.path.dirname(str(path))), "SAVING-2"), "w") as f:
            f.write(str(path))
        time.sleep(3600)


paddle.save = save_then_hang
from paddlerec.run import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save(tmp_path):
    make_workspace(tmp_path)
    driver = tmp_path / "slow_save.py"
    driver.write_text(SLOW_SAVE)
    marker = tmp_path / "ckpt" / "SAVING-2"
    proc, lines = start(["-m", str(tmp_path), "-o", "runner.train.epochs=5"], tmp_path, script=str(driver))
    deadline = time.monotonic() + GUARD_SECONDS
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the save of checkpoint 2 never started (exit {proc.poll()})"
    assert sigkill(proc) == -signal.SIGKILL
    marker.unlink()
    ckpt = tmp_path / "ckpt"
    # the half-written checkpoint is a hidden temporary folder that nothing picks up
    half = [n for n in os.listdir(ckpt) if n.startswith(".tmp-2-")]
    assert len(half) == 1 and os.listdir(ckpt / half[0]) == ["model.pdparams"]
    assert checkpoint_epochs(ckpt) == [1]
    assert load_every_checkpoint(ckpt) == [1]
    # resuming continues from 1, saves 2 and 3 for real, and clears the half-written folder
    assert resume_and_check(tmp_path) == [1, 2, 3]


@pytest.mark.slow
def test_sigkill_at_a_random_moment(tmp_path, test_seed):
    """Killed at a moment drawn at random once checkpoints are being written: whatever it hit
    (training, paddle.save, meta.json, the rename, the curves), what is left is usable.
    A fresh seed each run (printed; TEST_SEED=N replays it): over many runs the kills cover
    every part of the save."""
    make_workspace(tmp_path)
    proc, lines = start(["-m", str(tmp_path), "-o", "runner.train.epochs=200"], tmp_path)
    seen = []
    wait_for(proc, lines, r"saved checkpoint .*/1$", seen)
    time.sleep(float(np.random.default_rng(test_seed).uniform(0.0, 1.5)))
    assert sigkill(proc) == -signal.SIGKILL
    epochs = checkpoint_epochs(tmp_path / "ckpt")
    assert load_every_checkpoint(tmp_path / "ckpt") == epochs
    resume_and_check(tmp_path, extra_epochs=1)


# ---- a loss that becomes NaN -----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    path = make_workspace(folder)
    assert main(["-m", path, "--no-progress", "-q"]) == 0
    return folder


def _digest(root):
    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(base, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(trained, tmp_path, kernel):
    make_workspace(tmp_path)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    before = _digest(ckpt)
    proc = run_paddlerec(["-m", str(tmp_path), "-o", "mode=resume", "-o", f"hyper_parameters.kernel={kernel}",
                    "-o", "hyper_parameters.optimizer.learning_rate=1e38"])
    if kernel == "fused" and "config error: hyper_parameters.kernel: fused, but" in proc.stderr:
        pytest.skip("the fused kernel is not available here")
    line = assert_one_clean_error(proc, 1, "training error: epoch 3, batch ", "training stopped",
                                  "hyper_parameters.optimizer.learning_rate", f"Newest checkpoint: {ckpt / '2'}")
    assert re.search(r"batch \d+: the loss is (nan|inf|-inf);", line), line
    assert _digest(ckpt) == before  # nothing was added, replaced or left half-written
    assert load_every_checkpoint(ckpt) == [1, 2]


def test_nan_loss_before_any_checkpoint_leaves_nothing(tmp_path, capsys):
    path = make_workspace(tmp_path)
    assert main(["-m", path, "--no-progress", "-o", "hyper_parameters.optimizer.learning_rate=1e38"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training error: ")]
    assert len(lines) == 1 and "epoch 1, batch " in lines[0] and "Newest checkpoint: none yet" in lines[0]
    assert checkpoint_epochs(tmp_path / "ckpt") == [] and not leftovers(tmp_path / "ckpt")


def test_parent_folder_resumes_from_the_newest_complete_checkpoint(trained, tmp_path, caplog):
    import logging

    from paddlerec import checkpoint

    caplog.set_level(logging.INFO)
    path = make_workspace(tmp_path)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    (ckpt / "3").mkdir()  # copied by hand and cut short: no meta.json
    (ckpt / "3" / "model.pdparams").write_bytes(b"\x80partial")
    (ckpt / ".tmp-4-99999").mkdir()  # a save that was killed
    (ckpt / ".tmp-4-99999" / "meta.json").write_text('{"epoch": 4}')
    (ckpt / "notes").mkdir()
    assert checkpoint.resolve(str(ckpt), "key") == [str(ckpt / "2")]
    assert checkpoint.resolve(str(ckpt), "key", all_of_them=True) == [str(ckpt / "1"), str(ckpt / "2")]

    assert main(["-m", path, "--no-progress", "-o", "mode=resume"]) == 0
    assert f"continuing from {ckpt / '2'} (epoch 2)" in caplog.text
    assert checkpoint_epochs(ckpt) == [1, 2, 3, 4]  # the broken 3 was replaced by a complete one
    assert load_every_checkpoint(ckpt) == [1, 2, 3, 4]
    assert not leftovers(ckpt)
    assert {n for n in os.listdir(ckpt) if not n.startswith("curves")} == {"1", "2", "3", "4", "notes"}
