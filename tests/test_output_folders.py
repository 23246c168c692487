"""Every folder a run writes into is checked before any runner starts (issue 13, class 7):
a file in its place, a path under a file, or a folder this process cannot write into is one
config error line (exit 2), and nothing has been trained, read or written."""

import builtins
import errno
import os
import stat

import pytest

from paddlerec.run import main
from tests.helpers import base_config, entry, error_lines, make_workspace


def run_in_process(capsys, path, *overrides):
    args = ["-m", path, "--no-progress"]
    for override in overrides:
        args += ["-o", override]
    code = main(args)
    return code, capsys.readouterr().err


def assert_stopped_before_work(code, err, key, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"config error: {key}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "epoch 1" not in err and "dataset " not in err  # no training, no data read


@pytest.mark.parametrize("key,mode", [
    ("save_checkpoint_path", "train"),
    ("save_inference_path", "train"),
    ("predictions_path", "[train, infer]"),  # the infer runner's folder: checked before train starts
])
def test_a_file_where_an_output_folder_goes(tmp_path, capsys, key, mode):
    path = make_workspace(tmp_path)
    blocker = tmp_path / "taken"
    blocker.write_text("a file\n")
    runner = "infer" if key == "predictions_path" else "train"
    overrides = [f"mode={mode}", f"runner.{runner}.{key}={blocker}", "runner.train.save_inference_interval=1",
                 f"runner.train.save_inference_path={tmp_path / 'inference'}" if key != "save_inference_path" else ""]
    code, err = run_in_process(capsys, path, *[o for o in overrides if o])
    assert_stopped_before_work(code, err, f"runner.{runner}.{key}", f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "a file\n"
    assert not (tmp_path / "ckpt").exists()


def test_an_output_folder_under_a_file(tmp_path, capsys):
    path = make_workspace(tmp_path)
    (tmp_path / "taken").write_text("a file\n")
    target = tmp_path / "taken" / "deeper" / "ckpt"
    code, err = run_in_process(capsys, path, f"runner.train.save_checkpoint_path={target}")
    assert_stopped_before_work(code, err, "runner.train.save_checkpoint_path",
                               f"{target} cannot be created: {tmp_path / 'taken'} is a file")


def test_an_output_folder_that_is_a_dangling_link(tmp_path, capsys):
    path = make_workspace(tmp_path)
    (tmp_path / "ckpt").symlink_to(tmp_path / "gone")
    code, err = run_in_process(capsys, path)
    assert_stopped_before_work(code, err, "runner.train.save_checkpoint_path",
                               f"{tmp_path / 'ckpt'} is a symbolic link to {tmp_path / 'gone'}, which does not exist")


def _writable_despite_mode(folder):
    """Whether this process can create files in `folder` although its mode says read-only (root)."""
    probe = folder / "probe"
    try:
        probe.write_text("")
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize("where", ["the folder", "its parent"])
def test_an_output_folder_that_cannot_be_written(tmp_path, capsys, where):
    path = make_workspace(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked if where == "the folder" else locked / "ckpt"
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if _writable_despite_mode(locked):
            pytest.skip("this process writes into read-only folders (running as root)")
        code, err = run_in_process(capsys, path, f"runner.train.save_checkpoint_path={target}")
        assert_stopped_before_work(code, err, "runner.train.save_checkpoint_path", "not writable",
                                   "Permission denied")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(stat.S_IRWXU)


def test_a_distributed_runners_log_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PADDLE_TRAINER_ID", raising=False)
    config = base_config()
    runner = entry(config, "runner", "train")
    runner.update({"class": "local_cluster_train", "worker_num": 2, "log_dir": "{workspace}/log"})
    path = make_workspace(tmp_path, config)
    (tmp_path / "log").write_text("a file\n")
    code, err = run_in_process(capsys, path)
    assert_stopped_before_work(code, err, "runner.train.log_dir", "is a file, not a folder")
    assert not (tmp_path / "ckpt").exists()


def test_the_check_creates_nothing(tmp_path, capsys):
    """Output folders that do not exist yet pass the check and are not created by it: a run that
    stops on a later check (here init_model_path) leaves no trace."""
    path = make_workspace(tmp_path)
    code, err = run_in_process(capsys, path, "mode=resume", f"runner.resume.init_model_path={tmp_path / 'nothing'}",
                               f"runner.resume.save_checkpoint_path={tmp_path / 'new' / 'ckpt'}")
    assert code == 2 and "checkpoint error: runner.resume.init_model_path" in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS])
def test_an_output_folder_that_cannot_be_written_simulated(tmp_path, capsys, monkeypatch, error):
    """The same refusal as the file system gives it (as root the real one cannot be provoked)."""
    path = make_workspace(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(locked) + os.sep) and any(c in mode for c in "wax"):
            raise OSError(error, os.strerror(error), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    code, err = run_in_process(capsys, path, f"runner.train.save_checkpoint_path={locked / 'ckpt'}")
    assert_stopped_before_work(code, err, "runner.train.save_checkpoint_path",
                               f"{locked / 'ckpt'} cannot be created: {locked} is not writable ({os.strerror(error)})")
