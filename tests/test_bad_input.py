"""Bad input through the real entry points (issue 6): one clear line, a non-zero exit, no
traceback, nothing half-written.

Every case runs `python -m paddlerec.run` (or bench/accuracy.py) as a subprocess, as a user
meets it. Config mistakes stop before Paddle is imported (a fraction of a second each);
data, model and checkpoint mistakes cost one Paddle import each. Two cases that need to
break the disk run in this process with the real save path and a failing file system.
"""

import builtins
import errno
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from paddlerec.run import main
from tests.helpers import (N_ITEMS, PYTHON, REPO, assert_one_clean_error, checkpoint_epochs, error_lines, labels,
                           leftovers, make_workspace, run_paddlerec, train_small_model, write_sessions)


class InProcess:
    """paddlerec.run.main in this process, shaped like a CompletedProcess for assert_one_clean_error.

    Used where a case of the same kind already runs as a subprocess: it saves a Paddle import
    per case, and an exception escaping main() would fail the test just as a traceback would."""

    def __init__(self, capsys, args):
        capsys.readouterr()
        self.returncode = main(["--no-progress"] + list(args))
        self.stderr = capsys.readouterr().err


def outputs_absent(folder):
    for name in ("ckpt", "pred", "inference"):
        assert not os.path.exists(os.path.join(str(folder), name)), f"{name} was written"


@pytest.fixture
def ws(tmp_path):
    """A fresh workspace with a vocab; returns (folder, config path)."""
    return tmp_path, make_workspace(tmp_path, vocab=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Checkpoints 1 and 2 of the small model (40 items, layers [12]), made in this process."""
    return train_small_model(tmp_path_factory.mktemp("trained"))


def copy_checkpoints(trained, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", target)
    return target


def load_every_checkpoint(root):
    """Load each complete checkpoint under root (weights and optimizer state) the way training does."""
    import model as model_module
    from paddlerec import checkpoint
    from paddlerec.contract import DataInfo
    from paddlerec.params import validate_section

    loaded = []
    for epoch, path in checkpoint.list_checkpoints(str(root)):
        meta = checkpoint.read_meta(path)
        assert meta["epoch"] == epoch
        hp = validate_section(meta["hyper_parameters"], model_module.HYPER_PARAMETERS, "hyper_parameters")
        model = model_module.Model(hp, DataInfo(n_items=meta["data"]["n_items"]))
        checkpoint.check_signature(meta, model, path)
        checkpoint.load_into(model, path)
        assert all(np.isfinite(v.numpy()).all() for v in model.network.parameters())
        loaded.append(epoch)
    return loaded


# ---- config mistakes (no Paddle import: cheap) ------------------------------------------------

CONFIG_CASES = {
    # name: (overrides, fragments of the one error line)
    "unknown key": (["runner.train.epoch=3"], ["config error: runner.train.epoch: unknown key",
                                                "did you mean 'epochs'"]),
    "wrong type": (["dataset.train_data.batch_size=big"], ["config error: dataset.train_data.batch_size: "
                                                           "expected an int, got 'big'"]),
    "mode naming no runner": (["mode=[train, evaluate]"], ["config error: mode: no runner named 'evaluate'",
                                                           "train, resume, infer"]),
    "phase naming no dataset": (["phase.phase_train.dataset_name=clicks"],
                                ["config error: phase.phase_train.dataset_name: no dataset named 'clicks'",
                                 "train_data, test_data"]),
    "missing data path": (["dataset.train_data.data_path={workspace}/data/trian"],
                          ["config error: dataset.train_data.data_path: no such file or folder", "data/trian",
                           "data_prepare.sh"]),
    "missing model file": (["phase.phase_train.model={workspace}/gru4rec.py"],
                           ["config error: phase.phase_train.model: model file not found", "gru4rec.py"]),
    "missing reader file": (["dataset.train_data.data_converter={workspace}/reader.py"],
                            ["config error: dataset.train_data.data_converter: reader file not found"]),
    "export without a folder": (["runner.train.save_inference_interval=1"],
                                ["config error: runner.train.save_inference_path: missing"]),
    "override of an unknown entry": (["runner.cpu_train_runner.epochs=1"],
                                     ["config error: runner.cpu_train_runner: no runner entry named"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistake(ws, case):
    folder, path = ws
    overrides, fragments = CONFIG_CASES[case]
    args = ["-m", path]
    for text in overrides:
        args += ["-o", text]
    assert_one_clean_error(run_paddlerec(args), 2, *fragments)
    outputs_absent(folder)


def test_yaml_syntax_error(ws):
    folder, path = ws
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[3].startswith("  ")
    lines[3] = "\t" + lines[3].lstrip()  # indented with a tab on line 4, as editors sometimes do
    broken = folder / "broken.yaml"
    broken.write_text("\n".join(lines) + "\n")
    line = assert_one_clean_error(run_paddlerec(["-m", str(broken)]), 2, "config error:", "YAML syntax error", "fix the file")
    assert f"{broken}:4" in line
    outputs_absent(folder)


def test_missing_config_file(tmp_path):
    assert_one_clean_error(run_paddlerec(["-m", str(tmp_path / "config.yml")]), 2, "config error: -m: no such config file")


# ---- data mistakes ---------------------------------------------------------------------------

def _session_file(folder):
    return folder / "data" / "train" / "sessions.txt"


def _corrupt_line(folder, line_number, text):
    path = _session_file(folder)
    lines = path.read_text().splitlines()
    lines[line_number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("token", ["x7", "-1", "3.5"])
def test_session_line_with_a_token_that_is_not_an_item_id(ws, capsys, token):
    folder, path = ws
    bad = _corrupt_line(folder, 3, f"5 {token} 9")
    proc = run_paddlerec(["-m", path]) if token == "x7" else InProcess(capsys, ["-m", path])
    assert_one_clean_error(proc, 2, f"data error: {bad}:3: '{token}' is not an item id", "non-negative integers")
    outputs_absent(folder)


def test_item_id_outside_the_vocab(ws):
    folder, path = ws
    bad = _corrupt_line(folder, 4, f"1 2 {N_ITEMS}")
    assert_one_clean_error(run_paddlerec(["-m", path]), 2,
                           f"data error: {bad}:4: item id {N_ITEMS} is outside the vocab ({N_ITEMS} items",
                           "another vocab.txt")
    outputs_absent(folder)


def test_original_item_ids_without_a_vocab(tmp_path):
    """RSC15's own ids fed as model ids would ask for a 214-million-row model: refused with a pointer."""
    path = make_workspace(tmp_path, vocab=False)
    bad = _corrupt_line(tmp_path, 6, "214536502 214536500 214577561")
    assert_one_clean_error(run_paddlerec(["-m", path]), 2, f"data error: {bad}:6: item id 214577561",
                           "look like original item ids", "text2paddle.py", "vocab_path")
    outputs_absent(tmp_path)


@pytest.mark.parametrize("content", ["empty folder", "only hidden files and sub-folders"])
def test_data_folder_without_data_files(ws, capsys, content):
    folder, path = ws
    train = folder / "data" / "train"
    shutil.rmtree(train)
    train.mkdir()
    if content != "empty folder":
        (train / ".sessions.txt.swp").write_text("1 2 3\n")
        (train / "old").mkdir()
        (train / "old" / "sessions.txt").write_text("1 2 3\n")
    proc = run_paddlerec(["-m", path]) if content == "empty folder" else InProcess(capsys, ["-m", path])
    assert_one_clean_error(proc, 2, f"data error: {train}: the folder holds no data files", "put session files in it")
    outputs_absent(folder)


def test_data_file_without_sessions(ws, capsys):
    folder, path = ws
    _session_file(folder).write_text("\n\n")
    assert_one_clean_error(InProcess(capsys, ["-m", path]), 2, "data error:", "no sessions in the data")
    outputs_absent(folder)


def test_vocab_with_a_repeated_item(ws, capsys):
    folder, path = ws
    vocab = labels(N_ITEMS)
    vocab[7] = vocab[2]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    assert_one_clean_error(InProcess(capsys, ["-m", path]), 2, f"data error: {folder / 'vocab.txt'}:8:", "appears twice",
                           "line 3")
    outputs_absent(folder)


def test_unreadable_data(ws):
    folder, path = ws
    data_file = _session_file(folder)
    os.chmod(data_file, 0)
    try:
        try:
            with open(data_file):
                readable = True
        except PermissionError:
            readable = False
        if readable:
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 000 does not stop reads here")
        assert_one_clean_error(run_paddlerec(["-m", path]), 2, f"data error: {data_file}: cannot read: Permission denied")
        os.chmod(data_file, 0o644)
        os.chmod(data_file.parent, 0)
        assert_one_clean_error(run_paddlerec(["-m", path]), 2, f"data error: {data_file.parent}: cannot read the folder")
    finally:
        os.chmod(data_file.parent, 0o755)
        os.chmod(data_file, 0o644)
    outputs_absent(folder)


def test_unreadable_data_simulated(ws, capsys, monkeypatch):
    """The same two refusals as above, with the file system refusing instead of chmod (runs as root too)."""
    folder, path = ws
    data_file, data_folder = str(_session_file(folder)), str(_session_file(folder).parent)
    real_open, real_listdir = builtins.open, os.listdir

    def refusing_open(file, *args, **kwargs):
        if str(file) == data_file:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), data_file)
        return real_open(file, *args, **kwargs)

    def refusing_listdir(target="."):
        if str(target) == data_folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), data_folder)
        return real_listdir(target)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert_one_clean_error(InProcess(capsys, ["-m", path]), 2, f"data error: {data_file}: cannot read: Permission denied")
    monkeypatch.setattr(os, "listdir", refusing_listdir)
    assert_one_clean_error(InProcess(capsys, ["-m", path]), 2,
                           f"data error: {data_folder}: cannot read the folder: Permission denied")
    outputs_absent(folder)


def test_messy_but_valid_data_trains(tmp_path):
    """Hidden files and sub-folders are skipped with a log line; sessions of one click are skipped
    with a warning (no next click to learn); CRLF line ends and blank lines are fine."""
    train = tmp_path / "data" / "train"
    make_workspace(tmp_path)
    rng = np.random.default_rng(3)
    sessions = [list(rng.integers(0, N_ITEMS, rng.integers(2, 6))) for _ in range(60)] + [[i] for i in range(N_ITEMS)]
    rng.shuffle(sessions)
    sessions[5], sessions[9] = [17], [4]  # single clicks among the others too
    os.remove(train / "sessions.txt")
    write_sessions(str(train / "a.txt"), sessions[:50])
    with open(train / "b.txt", "w", newline="") as f:  # edited on Windows, with blank lines
        f.write("".join(" ".join(map(str, s)) + "\r\n" + ("\r\n" if i % 7 == 0 else "") for i, s in enumerate(sessions[50:])))
    (train / ".DS_Store").write_bytes(b"\x00\x01binary junk")
    (train / ".b.txt.swp").write_text("not item ids at all\n")
    (train / "backup").mkdir()
    (train / "backup" / "a.txt").write_text("junk that must not be read\n")
    expected_events = sum(len(s) - 1 for s in sessions if len(s) >= 2)
    n_single = sum(1 for s in sessions if len(s) == 1)

    proc = run_paddlerec(["-m", str(tmp_path / "config.yaml"), "-o", "runner.train.epochs=1"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{train}: skipped 3 hidden file(s) or sub-folder(s): .DS_Store, .b.txt.swp, backup" in proc.stderr
    assert f"WARNING {train}: ignored {n_single} session(s) shorter than 2 click(s)" in proc.stderr
    assert "epoch 1 done" in proc.stderr and f"events {expected_events}," in proc.stderr
    assert checkpoint_epochs(tmp_path / "ckpt") == [1]


# ---- model and reader files ------------------------------------------------------------------

def test_model_file_that_raises_on_import(ws):
    folder, path = ws
    bad = folder / "my_model.py"
    bad.write_text("import os\n\nSIZE = int(os.environ.get('NO_SUCH_SETTING', 'many'))\n")
    assert_one_clean_error(run_paddlerec(["-m", path, "-o", f"phase.phase_train.model={bad}"]), 2,
                           "error: phase.phase_train.model: the model file failed to load at",
                           f"{bad}:3", "ValueError: invalid literal for int()")
    outputs_absent(folder)


@pytest.mark.parametrize("source, fragments", [
    ("def broken(:\n    pass\n", [":1", "SyntaxError"]),
    ("import paddle\nHYPER_PARAMETERS = ()\n", ["does not define Model", "The model contract"]),
    ("from paddlerec.params import Param\nHYPER_PARAMETERS = ()\nclass Model:\n"
     "    def __init__(self, hparams, data):\n        self.x = data.no_such_field\n",
     ["building the model failed at", ".py:5: AttributeError"]),
])
def test_other_model_file_mistakes_in_process(ws, capsys, source, fragments):
    folder, path = ws
    bad = folder / f"model_{abs(hash(source))}.py"
    bad.write_text(source)
    proc = InProcess(capsys, ["-m", path, "-o", f"phase.phase_train.model={bad}", "-o", "hyper_parameters={}"])
    assert_one_clean_error(proc, 2, "error: phase.phase_train.model: ", *fragments)
    outputs_absent(folder)


def test_reader_file_that_raises(ws, capsys):
    folder, path = ws
    bad = folder / "reader.py"
    bad.write_text("class Reader:\n    def __init__(self, data_path, vocab_path):\n        raise KeyError('x')\n")
    proc = InProcess(capsys, ["-m", path, "-o", f"dataset.train_data.data_converter={bad}"])
    line = assert_one_clean_error(proc, 2, f"{bad}:3: KeyError")
    assert line.startswith("error: dataset.train_data: the reader file failed")
    outputs_absent(folder)


# ---- init_model_path -------------------------------------------------------------------------

def test_init_model_path_pointing_at_nothing(ws):
    folder, path = ws
    assert_one_clean_error(run_paddlerec(["-m", path, "-o", "mode=resume",
                                    "-o", "runner.resume.init_model_path={workspace}/chekpoints"]), 2,
                           "checkpoint error: runner.resume.init_model_path:", "chekpoints does not exist",
                           "train first")
    outputs_absent(folder)


def test_init_model_path_without_a_complete_checkpoint(ws, capsys):
    folder, path = ws
    ckpt = folder / "old"
    (ckpt / "3").mkdir(parents=True)  # no meta.json: never finished
    (ckpt / ".tmp-4-12345").mkdir()
    (ckpt / ".tmp-4-12345" / "meta.json").write_text("{}")
    assert_one_clean_error(InProcess(capsys, ["-m", path, "-o", "mode=resume",
                                              "-o", f"runner.resume.init_model_path={ckpt}"]),
                           2, f"checkpoint error: runner.resume.init_model_path: {ckpt} holds no complete checkpoint")
    assert not (ckpt / "3" / "meta.json").exists()


def test_checkpoint_of_another_vocab_size(trained, tmp_path):
    make_workspace(tmp_path, vocab=True)
    bigger = labels(N_ITEMS + 10)
    (tmp_path / "vocab.txt").write_text("\n".join(bigger) + "\n")
    ckpt = copy_checkpoints(trained, tmp_path)
    assert_one_clean_error(run_paddlerec(["-m", str(tmp_path), "-o", "mode=resume"]), 2,
                           f"checkpoint error: {ckpt / '2'} was trained with another model shape",
                           f"n_items: checkpoint {N_ITEMS}, this config {N_ITEMS + 10}")
    assert checkpoint_epochs(ckpt) == [1, 2] and not leftovers(ckpt)


def test_checkpoint_of_another_hidden_size(trained, tmp_path, capsys):
    make_workspace(tmp_path, vocab=True)
    ckpt = copy_checkpoints(trained, tmp_path)
    assert_one_clean_error(InProcess(capsys, ["-m", str(tmp_path), "-o", "mode=resume",
                                              "-o", "hyper_parameters.layers=[20]"]),
                           2, "checkpoint error:", "another model shape", "layers: checkpoint [12], this config [20]",
                           "change the config to match it")
    assert checkpoint_epochs(ckpt) == [1, 2] and not leftovers(ckpt)


def test_infer_with_a_vocab_of_another_size(trained, tmp_path, capsys):
    make_workspace(tmp_path, vocab=True)
    (tmp_path / "vocab.txt").write_text("\n".join(labels(N_ITEMS + 1)) + "\n")
    copy_checkpoints(trained, tmp_path)
    assert_one_clean_error(InProcess(capsys, ["-m", str(tmp_path), "-o", "mode=infer"]), 2,
                           "checkpoint error:", f"the model knows {N_ITEMS} items but the vocab",
                           "use the vocab the model was trained with")
    assert not (tmp_path / "pred").exists()


# ---- bench/accuracy.py -----------------------------------------------------------------------

def run_accuracy(args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([PYTHON, os.path.join(REPO, "bench", "accuracy.py"), "--no-progress"] + args, cwd=str(cwd),
                          capture_output=True, text=True, timeout=600, env=env)


def test_accuracy_bench_bad_input(tmp_path):
    good = tmp_path / "train.tsv"
    good.write_text("SessionId\tItemId\tTime\n1\t10\t1396300000\n1\t11\t1396300010\n")
    headless = tmp_path / "test.tsv"
    headless.write_text("1\t10\t1396300000\n")
    missing = tmp_path / "nothing.tsv"
    work = tmp_path / "work"

    proc = run_accuracy(["--train", str(missing), "--test", str(good), "--workdir", str(work)], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        f"data error: --train: no such file: {missing}"]
    proc = run_accuracy(["--train", str(good), "--test", str(headless), "--workdir", str(work)], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--test: {headless}:1: the header lacks SessionId, ItemId, Time" in proc.stderr
    proc = run_accuracy(["--train", str(good), "--test", str(good), "--workdir", str(work),
                         "-o", "runner.cpu_train_runner.epoch=1"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config error: runner.cpu_train_runner.epoch: unknown key" in proc.stderr
    assert not work.exists()  # every mistake above was caught before any work


# ---- a full disk -----------------------------------------------------------------------------

class FullDisk:
    """builtins.open for files under `marker` paths: writes fail with ENOSPC after `budget` bytes,
    as on a disk that fills up midway through a file. Everything else is the real open."""

    def __init__(self, monkeypatch, marker, budget=1000):
        self.marker, self.budget, self.hits = marker, budget, 0
        self.real_open = builtins.open
        monkeypatch.setattr(builtins, "open", self.open)

    def open(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and self.marker in str(file) and any(c in mode for c in "wax"):
            self.hits += 1
            return _Filling(handle, self)
        return handle


class _Filling:
    def __init__(self, handle, disk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        if self._disk.budget < len(data):
            self._handle.write(data[:self._disk.budget])  # what fits is written, as the kernel does
            self._disk.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.budget -= len(data)
        return self._handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()
        return False

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills up while checkpoint 2 is written (paddle.save, the real save path): exit 1,
    a message that says to free space, checkpoint 1 intact and loadable, no temporary folder left."""
    path = make_workspace(tmp_path, vocab=True)
    disk = FullDisk(monkeypatch, marker=f"{os.sep}.tmp-2-")
    code = main(["-m", path, "--no-progress", "-o", "runner.train.epochs=3"])
    assert disk.hits >= 1  # the failure came from inside the real save
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"save error: cannot write {tmp_path / 'ckpt' / '2'}: No space left on device")
    assert "free some disk space" in lines[0] and "Earlier checkpoints are untouched" in lines[0]
    assert checkpoint_epochs(tmp_path / "ckpt") == [1]
    assert not leftovers(tmp_path / "ckpt")
    monkeypatch.undo()
    assert load_every_checkpoint(tmp_path / "ckpt") == [1]


def test_full_disk_while_writing_predictions(trained, tmp_path, monkeypatch, capsys):
    make_workspace(tmp_path, vocab=True)
    copy_checkpoints(trained, tmp_path)
    pred = tmp_path / "pred"
    disk = FullDisk(monkeypatch, marker=str(pred), budget=300)
    assert main(["-m", str(tmp_path), "--no-progress", "-o", "mode=infer"]) == 1
    assert disk.hits == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"save error: cannot write {pred / '1.txt'}: No space left")
    assert "free some disk space" in lines[0]
    assert os.listdir(pred) == []  # the partial file is gone


def _can_mount_tmpfs(folder):
    """Whether a tmpfs can be mounted in a private mount namespace (gone when its process ends)."""
    if shutil.which("unshare") is None:
        return False
    folder.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_really_full_disk(tmp_path):
    """Real small file systems (private tmpfs mounts; need mount rights, else skipped) for the
    checkpoints and for the inference models: training runs until one is full. Every
    checkpoint and inference model left must be complete, and each export must hold the weights
    of its epoch (Paddle's jit.save truncates its files on a full disk without an error; the
    io.json written after it is what fails)."""
    if not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("cannot mount a private tmpfs here (needs unshare and mount rights)")
    make_workspace(tmp_path, vocab=True)
    for name in ("ckpt", "inference", "kept"):
        (tmp_path / name).mkdir()
    # sized so that the inference models' disk fills first (the export is the path Paddle gets wrong)
    command = (f"mount -t tmpfs -o size=400k tmpfs {tmp_path}/ckpt && mount -t tmpfs -o size=100k tmpfs "
               f"{tmp_path}/inference && {PYTHON} -m paddlerec.run -m {tmp_path} --no-progress "
               f"-o runner.train.epochs=40 -o runner.train.save_inference_interval=1 "
               f"-o runner.train.save_inference_path={tmp_path}/inference; echo \"exit=$?\" >&2; "
               f"cp -a {tmp_path}/ckpt {tmp_path}/kept/ckpt && cp -a {tmp_path}/inference {tmp_path}/kept/inference")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, env=env,
                          timeout=600)
    assert "exit=1" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "free some disk space" in lines[0], lines
    assert re.match(rf"save error: cannot write {tmp_path}/(ckpt|inference)/\d+: ", lines[0]), lines[0]
    ckpt, inference = tmp_path / "kept" / "ckpt", tmp_path / "kept" / "inference"
    epochs = load_every_checkpoint(ckpt)
    assert epochs and epochs == list(range(1, len(epochs) + 1))
    assert not [n for n in leftovers(ckpt) + leftovers(inference) if n.startswith((".tmp-", ".old-"))]
    exported = sorted(int(n) for n in os.listdir(inference) if n.isdigit())
    assert exported and all((inference / str(e) / "io.json").is_file() for e in exported)
    _assert_exports_match_checkpoints(ckpt, inference, [e for e in exported if e in epochs])


def _assert_exports_match_checkpoints(ckpt, inference, epochs):
    import json

    import model as model_module
    import paddle
    from paddle import inference as paddle_inference
    from paddlerec import checkpoint
    from paddlerec.contract import DataInfo
    from paddlerec.params import validate_section

    assert epochs
    items = np.arange(N_ITEMS, dtype=np.int64)
    for epoch in epochs:
        meta = checkpoint.read_meta(str(ckpt / str(epoch)))
        hp = validate_section(meta["hyper_parameters"], model_module.HYPER_PARAMETERS, "hyper_parameters")
        model = model_module.Model(hp, DataInfo(n_items=meta["data"]["n_items"]))
        checkpoint.load_into(model, str(ckpt / str(epoch)), with_optimizer=False)
        folder = inference / str(epoch)
        io = json.loads((folder / "io.json").read_text())
        config = paddle_inference.Config(str(folder / "model.json"), str(folder / "model.pdiparams"))
        config.disable_glog_info()
        predictor = paddle_inference.create_predictor(config)
        hidden = np.zeros((N_ITEMS, io["hidden_size"]), np.float32)
        nothing_excluded = np.full((N_ITEMS, 1), io["n_items"], np.int64)  # the padding id
        for spec, value in zip(io["inputs"], (items, hidden, nothing_excluded)):  # as paddlerec/export.py lists them
            name = spec["name"]
            predictor.get_input_handle(name).reshape(list(value.shape))
            predictor.get_input_handle(name).copy_from_cpu(value)
        predictor.run()
        next_hidden = predictor.get_output_handle(predictor.get_output_names()[2]).copy_to_cpu()
        with paddle.no_grad():
            _, expected = model.network.step(paddle.to_tensor(items), [paddle.to_tensor(hidden)])
        np.testing.assert_allclose(next_hidden, expected[0].numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"inference model {epoch} does not hold the weights of checkpoint {epoch}")
