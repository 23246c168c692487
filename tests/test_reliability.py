"""What an adversarial tester found (issue 13), class by class, several members of each.

Every case ends in correct data, or in one clear line and a non-zero exit with no traceback
and nothing half-written. Config cases stop before Paddle is imported (a fraction of a second
each); checkpoint cases run `paddlerec.run.main` in this process on checkpoints trained once
per module.
"""

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

import rsc15_reader
from paddlerec import checkpoint, files, yamlfile
from paddlerec.config import DATASET_PARAMS, PHASE_PARAMS, load_config
from paddlerec.errors import ConfigError, DataError
from paddlerec.params import INT64_MAX, validate_section
from paddlerec.registry import RUNNER_CLASSES
from paddlerec.run import main
from tests.helpers import (N_ITEMS, PYTHON, REPO, assert_one_clean_error, base_config, checkpoint_epochs, leftovers,
                           make_workspace, train_small_model, write_config, write_sessions)

DATA_DIR = os.path.join(REPO, "data")


def load_script(name):
    """Import data/<name>.py by path (data/ is not a package)."""
    module_name = f"reliability_data_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(DATA_DIR, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run(command, timeout=300, **kwargs):
    env = dict(os.environ, PYTHONPATH=REPO, PYTHON=PYTHON, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, **kwargs)


def assert_one_line(proc, code, prefix, *fragments):
    """Exit `code`, no traceback, exactly one line starting with `prefix`, holding every fragment."""
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def dead_pid():
    """The pid of a process that has ended (a killed writer's, as a leftover name carries it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Run:
    """paddlerec.run.main in this process, shaped like a CompletedProcess."""

    def __init__(self, capsys, args):
        capsys.readouterr()
        self.returncode = main(["--no-progress"] + list(args))
        self.stderr = capsys.readouterr().err


# ---- class 1: temporaries in the data folders ---------------------------------------------------

class FullOnClose:
    """A file whose close() reports a full disk (where a full disk often shows first)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.real.close()
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk_on_close(monkeypatch, module):
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        stream = real_open(path, mode, *args, **kwargs)
        return FullOnClose(stream) if "w" in mode else stream

    monkeypatch.setattr(module, "open", failing_open, raising=False)


TSV = "SessionId\tItemId\tTime\n" + "".join(f"{s}\t{100 + (s * 7 + k) % 13}\t{s * 100 + k}.5\n"
                                           for s in range(1, 30) for k in range(3))


def write_prepared(folder, text=TSV):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "x_train_full.tsv"), "w") as f:
        f.write(text)
    with open(os.path.join(folder, "x_test.tsv"), "w") as f:
        f.write(text)


def write_in_all_train(tmp_path):
    t2p = load_script("text2paddle")
    source = tmp_path / "sessions.txt"
    source.write_text("5 6 7\n6 7\n7 5 6 5\n")
    t2p.build(str(source), str(source), str(tmp_path / "vocab.txt"), str(tmp_path / "all_train" / "train.txt"),
              str(tmp_path / "all_test" / "test.txt"))
    return ["vocab.txt", "all_train/train.txt", "all_test/test.txt"]


def write_in_converted(tmp_path):
    convert = load_script("convert_format")
    write_prepared(tmp_path / "prepared")
    convert.convert(str(tmp_path / "prepared" / "x_train_full.tsv"), str(tmp_path / "converted" / "train.txt"))
    return ["converted/train.txt"]


def write_in_prepared(tmp_path):
    preprocess = load_script("preprocess")
    clicks = preprocess.Clicks(*(np.arange(12, dtype=np.int64) for _ in range(3)))
    splits = {name: clicks for name in preprocess.SPLIT_NAMES}
    paths = preprocess.split_paths(str(tmp_path / "prepared" / "rsc15"))
    os.makedirs(tmp_path / "prepared", exist_ok=True)
    preprocess._write_outputs_atomically(paths, splits)
    return [os.path.relpath(p, tmp_path) for p in paths.values()]


WRITERS = {
    "all_train": (write_in_all_train, files),
    "converted": (write_in_converted, files),
    "prepared": (write_in_prepared, "preprocess"),
}


def folder_listing(root):
    return sorted(os.path.relpath(os.path.join(base, name), root)
                  for base, _, names in os.walk(root) for name in names)


@pytest.mark.parametrize("folder", sorted(WRITERS))
def test_a_full_disk_at_close_leaves_no_temporary_and_the_old_output(folder, tmp_path, monkeypatch):
    write, patched = WRITERS[folder]
    outputs = write(tmp_path)  # a first, complete run
    before = {name: (tmp_path / name).read_bytes() for name in outputs}
    listing = folder_listing(tmp_path)
    full_disk_on_close(monkeypatch, load_script(patched) if isinstance(patched, str) else patched)
    with pytest.raises(OSError) as failure:
        write(tmp_path)
    assert failure.value.errno == errno.ENOSPC
    assert folder_listing(tmp_path) == listing  # no temporary, hidden or not
    assert {name: (tmp_path / name).read_bytes() for name in outputs} == before


@pytest.mark.parametrize("folder", sorted(WRITERS))
def test_leftovers_of_killed_runs_are_removed_by_the_rerun(folder, tmp_path):
    write, _ = WRITERS[folder]
    outputs = write(tmp_path)
    target_dir = tmp_path / os.path.dirname(outputs[0])
    dead, alive = dead_pid(), os.getppid()
    stem, ext = os.path.splitext(os.path.basename(outputs[0]))
    stale = [f".{stem}.tmp-{dead}{ext}", f"{stem}{ext}.tmp{dead}"]  # this version's, and the older scripts'
    running = f".{stem}.tmp-{alive}{ext}"  # a writer still at work: not ours to remove
    for name in stale + [running]:
        (target_dir / name).write_text("1 2 3\n" * 50)
    write(tmp_path)
    left = sorted(os.listdir(target_dir))
    assert not set(stale) & set(left), left
    assert running in left


def test_the_reader_never_loads_a_temporary(tmp_path, caplog):
    folder = tmp_path / "all_train"
    write_sessions(str(folder / "train.txt"), [[0, 1, 2], [1, 2]])
    for name in (".train.tmp-123.txt", "train.txt.tmp4567", "train.txt.tmp-89.txt", f".train.tmp-{os.getpid()}.txt"):
        write_sessions(str(folder / name), [[0, 1]] * 40)
    with caplog.at_level("INFO"):
        reader = rsc15_reader.Reader(str(folder))
    assert reader.n_queries == 2
    assert "train.txt.tmp4567" in caplog.text and "train.txt.tmp-89.txt" in caplog.text
    assert "interrupted write" in caplog.text


# ---- class 2: data_prepare.sh decides by content -------------------------------------------------

def prepare(prepared, out):
    return run(["sh", os.path.join(REPO, "data_prepare.sh"), "--prepared", str(prepared), "--out", str(out),
                "--config", os.path.join(REPO, "config.yaml")])


def age(path, seconds=10 * 86400):
    """Give `path` an old modification time, as cp -p, rsync -a, tar and 7z do."""
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_data_prepare_reruns_when_content_changes_whatever_the_mtime(tmp_path):
    prepared, out = tmp_path / "prepared", tmp_path / "out"
    write_prepared(prepared)
    first = prepare(prepared, out)
    assert first.returncode == 0, first.stderr
    vocab_before = (out / "vocab.txt").read_text()
    again = prepare(prepared, out)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout

    # member 1: an input replaced by other content carrying an older mtime
    changed = TSV + "".join(f"999\t{200 + k}\t{99999 + k}.5\n" for k in range(3))
    write_prepared(prepared, changed)
    for name in os.listdir(prepared):
        age(prepared / name)
    third = prepare(prepared, out)
    assert third.returncode == 0, third.stderr
    assert "[convert] running" in third.stdout and "[vocab] running" in third.stdout
    vocab_after = (out / "vocab.txt").read_text().split()
    assert vocab_after[-3:] == ["200", "201", "202"] and vocab_after != vocab_before.split()

    # member 2: an output edited by hand (old mtime too) is rebuilt, not trusted
    (out / "all_train" / "train.txt").write_text("0 1\n")
    age(out / "all_train" / "train.txt")
    fourth = prepare(prepared, out)
    assert "[vocab] running" in fourth.stdout and "[convert] up to date" in fourth.stdout, fourth.stdout
    assert len((out / "all_train" / "train.txt").read_text().splitlines()) == 30

    # member 3: the same content rewritten with a new mtime does no work
    write_prepared(prepared, changed)
    fifth = prepare(prepared, out)
    assert "nothing to do" in fifth.stdout, fifth.stdout
    assert not [n for n in os.listdir(out / ".stamps") if n.startswith(".")]


def test_data_prepare_help_names_no_path_of_this_machine():
    proc = run(["sh", os.path.join(REPO, "data_prepare.sh"), "--help"])
    assert proc.returncode == 0
    assert "/work/" not in proc.stdout and "/tmp/" not in proc.stdout and os.path.expanduser("~") + "/" not in \
        proc.stdout


@pytest.mark.parametrize("problem", ["bad YAML", "unknown key", "missing dataset"])
def test_data_prepare_checks_the_config_before_any_data_work(problem, tmp_path):
    import yaml

    config = yaml.safe_load(open(os.path.join(REPO, "config.yaml")))
    if problem == "bad YAML":
        text = "dataset: [\n"
    else:
        if problem == "unknown key":
            config["runner"][0]["epochz"] = 3
        else:
            config["dataset"] = [d for d in config["dataset"] if d["name"] != "dataset_infer"]
        text = yaml.safe_dump(config)
    (tmp_path / "bad.yaml").write_text(text)
    write_prepared(tmp_path / "prepared")
    proc = run(["sh", os.path.join(REPO, "data_prepare.sh"), "--prepared", str(tmp_path / "prepared"),
                "--out", str(tmp_path / "out"), "--config", str(tmp_path / "bad.yaml")])
    assert_one_line(proc, 2, "error: ", "bad.yaml")
    assert "running" not in proc.stdout  # no step started
    assert sorted(os.listdir(tmp_path / "out")) == []


def test_data_prepare_refuses_an_unwritable_out_before_any_work(tmp_path):
    write_prepared(tmp_path / "prepared")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = prepare(tmp_path / "prepared", blocker / "out")
    assert_one_line(proc, 2, "error: ", "--out")
    assert "running" not in proc.stdout


# ---- class 3: checkpoints are verified --------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Checkpoints 1 and 2 of the small model (40 items, layers [12]), made in this process."""
    return train_small_model(tmp_path_factory.mktemp("trained"))


def rewrite_meta(path, change):
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta = change(meta)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def save_weights(path, change):
    """Replace model.pdparams by change(state) and record its new size and sha256: only the tensor
    check can tell."""
    full = os.path.join(path, "model.pdparams")
    state = paddle.load(full)
    paddle.save(change(state), full)

    def record(meta):
        meta["files"]["model.pdparams"] = files.file_digest(full)
        return meta
    rewrite_meta(path, record)


def flip_a_byte(path):
    full = os.path.join(path, "model.pdparams")
    data = bytearray(open(full, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(full, "wb").write(bytes(data))


def first_tensor(state):
    return sorted(state)[0]


DAMAGES = {
    "0-byte weights": (lambda p: open(os.path.join(p, "model.pdparams"), "wb").close(), "is empty (0 bytes)"),
    "0-byte meta.json": (lambda p: open(os.path.join(p, "meta.json"), "wb").close(), "is empty (0 bytes)"),
    "folder for weights": (lambda p: (os.remove(os.path.join(p, "model.pdparams")),
                                      os.mkdir(os.path.join(p, "model.pdparams"))), "is a folder, not a file"),
    "flipped byte": (flip_a_byte, "sha256 differs"),
    "truncated weights": (lambda p: os.truncate(os.path.join(p, "model.pdparams"), 100), "bytes, but"),
    "meta []": (lambda p: rewrite_meta(p, lambda m: []), "not the checkpoint's description"),
    "meta null": (lambda p: rewrite_meta(p, lambda m: None), "not the checkpoint's description"),
    "meta not JSON": (lambda p: open(os.path.join(p, "meta.json"), "w").write("{epoch: 1"), "not valid JSON"),
    "meta without data": (lambda p: rewrite_meta(p, lambda m: {k: v for k, v in m.items() if k != "data"}),
                          "missing or malformed data"),
    "meta without signature": (lambda p: rewrite_meta(p, lambda m: {k: v for k, v in m.items() if k != "signature"}),
                               "missing or malformed signature"),
    "meta epoch a string": (lambda p: rewrite_meta(p, lambda m: dict(m, epoch="2")), "malformed epoch"),
    "meta without checksums": (lambda p: rewrite_meta(p, lambda m: {k: v for k, v in m.items() if k != "files"}),
                               "missing or malformed files"),
    "a tensor of another shape": (lambda p: save_weights(p, lambda s: dict(s, **{
        first_tensor(s): paddle.zeros([3] + list(s[first_tensor(s)].shape), dtype="float32")})), "this model needs"),
    "a float64 tensor": (lambda p: save_weights(p, lambda s: dict(s, **{
        first_tensor(s): s[first_tensor(s)].astype("float64")})), "float64"),
    "a missing tensor": (lambda p: save_weights(p, lambda s: {k: v for k, v in s.items() if k != first_tensor(s)}),
                         "missing"),
    "an extra tensor": (lambda p: save_weights(p, lambda s: dict(s, stray=paddle.zeros([2]))), "unexpected stray"),
    "weights not a mapping": (lambda p: save_weights(p, lambda s: [1, 2, 3]), "not named weights"),
}


@pytest.mark.parametrize("runner", ["resume", "infer"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_is_one_line_for_resume_and_infer(damage, runner, trained, tmp_path, capsys):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    shutil.copytree(trained / "data", tmp_path / "data")
    shutil.copy(trained / "vocab.txt", tmp_path / "vocab.txt")
    config = write_config(tmp_path, base_config(vocab=True))
    make_damage, fragment = DAMAGES[damage]
    make_damage(str(tmp_path / "ckpt" / "1"))
    # infer reads every checkpoint of the folder, resume the one named
    args = ["-m", config, "-o", f"mode={runner}"]
    if runner == "resume":
        args += ["-o", "runner.resume.init_model_path={workspace}/ckpt/1"]
    proc = Run(capsys, args)
    line = assert_one_clean_error(proc, 2, "checkpoint error", fragment)
    assert str(tmp_path / "ckpt" / "1") in line
    assert checkpoint_epochs(tmp_path / "ckpt") == [1, 2]  # nothing new was saved
    assert not (tmp_path / "pred").exists()


def test_a_checkpoint_records_every_tensor_and_the_checksum_of_each_file(trained):
    meta = checkpoint.read_meta(str(trained / "ckpt" / "2"))
    state = paddle.load(str(trained / "ckpt" / "2" / "model.pdparams"))
    assert meta["format"] == checkpoint.FORMAT
    assert meta["tensors"] == {k: {"shape": list(v.shape), "dtype": str(v.dtype).split(".")[-1]}
                               for k, v in state.items()}
    assert {t["dtype"] for t in meta["tensors"].values()} == {"float32", "int64"}
    for name in ("model.pdparams", "optimizer.pdopt"):
        assert meta["files"][name] == files.file_digest(str(trained / "ckpt" / "2" / name))


# ---- class 4: numbers the config must refuse ----------------------------------------------------

def every_declaration():
    import model as model_module

    yield "dataset", DATASET_PARAMS
    yield "phase", PHASE_PARAMS
    for name, runner_class in RUNNER_CLASSES.items():
        yield f"runner[{name}]", runner_class.params
    yield "hyper_parameters", model_module.HYPER_PARAMETERS


def nested(name, value):
    """{'a': {'b': value}} for 'a.b'."""
    out = value
    for part in reversed(name.split(".")):
        out = {part: out}
    return out


def required_values(params):
    """A value for every required key, so that only the key under test can fail."""
    values = {}
    for p in params:
        if p.required:
            sample = {"int": 1, "float": 1.0, "str": "x", "path": "x", "names": ["x"], "list[int]": [1],
                      "list[float]": [1.0], "list[str]": ["x"], "bool": True}[p.type]
            values = _merge(values, nested(p.name, sample))
    return values


def _merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def numeric_params(kind):
    for section, params in every_declaration():
        for p in params:
            if p.type in (kind, f"list[{kind}]"):
                yield section, params, p


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_float_setting_refuses_nan_and_inf(bad):
    checked = 0
    for section, params, p in numeric_params("float"):
        value = [bad] if p.type.startswith("list") else bad
        values = _merge(required_values(params), nested(p.name, value))
        with pytest.raises(ConfigError, match="finite") as refused:
            validate_section(values, params, section)
        assert p.name in str(refused.value)
        checked += 1
    assert checked >= 8  # dropout, momentum, logq, learning rate, ... and the serve runner's


def test_every_int_setting_refuses_a_number_beyond_its_bound_and_names_it():
    for section, params, p in numeric_params("int"):
        for bad in (2**70, -(2**70)):
            value = [bad] if p.type.startswith("list") else bad
            values = _merge(required_values(params), nested(p.name, value))
            with pytest.raises(ConfigError) as refused:
                validate_section(values, params, section)
            message = str(refused.value)
            assert p.name in message and ("<=" in message or ">=" in message), message


@pytest.mark.parametrize("override, bound", [
    ("hyper_parameters.seed=4294967296", "<= 4294967295"),
    ("hyper_parameters.seed=-1", ">= 0"),
    ("hyper_parameters.sample_store=1000000000000", "<= 100000000"),
    ("hyper_parameters.n_sample=100000000", "<= 100000"),
    ("hyper_parameters.layers=[10000000]", "<= 4096"),
    ("hyper_parameters.embedding_size=100000000", "<= 4096"),
    ("phase.phase_train.thread_num=100000", "<= 1024"),
    ("dataset.train_data.batch_size=1000000000", "<= 100000"),
    ("hyper_parameters.dropout_hidden=.nan", "finite"),
    ("hyper_parameters.optimizer.momentum=.inf", "finite"),
    ("hyper_parameters.logq=-.inf", "finite"),
    ("hyper_parameters.bpreg=1e400", "finite"),
])
def test_the_runner_refuses_bad_numbers_before_training(override, bound, tmp_path, capsys):
    config = make_workspace(tmp_path, vocab=True)
    proc = Run(capsys, ["-m", config, "-o", override])
    key = override.split("=")[0].split(".")[-1]
    assert_one_clean_error(proc, 2, "config error", key, bound)
    assert not (tmp_path / "ckpt").exists()


# ---- class 5: config files ---------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))

BAD_YAML = {
    "not UTF-8": (b"workspace: .\nmode: [caf\xe9]\n", "not UTF-8 text"),
    "UTF-16": ("workspace: .\n".encode("utf-16"), "not UTF-8 text"),
    "duplicate key": (b"workspace: .\nmode: [a]\nworkspace: ..\n", "'workspace' appears twice"),
    "duplicate nested key": (b"hyper_parameters:\n  seed: 1\n  layers: [3]\n  seed: 2\n", "'seed' appears twice"),
    "alias bomb": (BOMB.encode(), "alias bomb"),
    "recursive alias": (b"workspace: .\nmode: &m [a, *m]\n", "recursive alias"),
    "recursive mapping": (b"hyper_parameters: &h\n  inner: *h\n", "recursive alias"),
    "deep nesting": (b"mode: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
}


def entry_point(which, path, tmp_path):
    if which == "run":
        return [PYTHON, "-m", "paddlerec.run", "-m", path]
    if which == "serve":
        return [PYTHON, "-m", "paddlerec.serve", "-m", path]
    os.makedirs(tmp_path / "prepared", exist_ok=True)
    write_prepared(tmp_path / "prepared")
    return ["sh", os.path.join(REPO, "data_prepare.sh"), "--prepared", str(tmp_path / "prepared"), "--out",
            str(tmp_path / "out"), "--config", path]


@pytest.mark.parametrize("which", ["run", "serve", "data_prepare"])
@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_a_bad_config_file_is_one_line_and_exit_2(case, which, tmp_path):
    data, fragment = BAD_YAML[case]
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    proc = run(entry_point(which, str(path), tmp_path), timeout=60)
    prefix = "config error: " if which != "data_prepare" else "error: "
    line = assert_one_line(proc, 2, prefix, fragment, str(path))
    assert len(line) < 400


def test_the_strict_loader_keeps_what_configs_use():
    text = ("base: &base {learning_rate: 1e-3, momentum: 0.0}\n"
            "optimizer:\n  <<: *base\n  momentum: 0.5\n"
            "layers: &l [100]\nagain: *l\n")
    value = yamlfile.load_text(text)
    assert value["optimizer"] == {"learning_rate": 0.001, "momentum": 0.5}
    assert value["again"] == [100]
    assert yamlfile.decode("\ufeffa: 1\n".encode("utf-8")) == "a: 1\n"


def test_an_override_cannot_smuggle_an_alias_bomb(tmp_path):
    config = make_workspace(tmp_path)
    with pytest.raises(ConfigError, match="alias"):
        load_config(config, ["hyper_parameters.layers=&a [*a]"])


# ---- class 6: data files -----------------------------------------------------------------------

SESSIONS = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [1, 3]]


@pytest.mark.parametrize("line_end", [b"\r", b"\r\n", b"\n\n"])
def test_line_ends_do_not_merge_sessions(line_end, tmp_path):
    lf = tmp_path / "lf.txt"
    write_sessions(str(lf), SESSIONS)
    other = tmp_path / "other.txt"
    other.write_bytes(line_end.join(" ".join(map(str, s)).encode() for s in SESSIONS) + line_end)
    expected = rsc15_reader.read_session_file(str(lf), None)
    got = rsc15_reader.read_session_file(str(other), None)
    if line_end == b"\n\n":  # an empty line is an empty session, dropped as too short
        got = rsc15_reader.drop_short(got, 1, None)
    assert np.array_equal(got.items, expected.items) and np.array_equal(got.offsets, expected.offsets)


def test_cr_only_files_go_through_the_data_scripts(tmp_path):
    t2p = load_script("text2paddle")
    source = tmp_path / "train.txt"
    source.write_bytes(b"15 16 17\r16 17\r17 15\r")
    t2p.build(str(source), str(source), str(tmp_path / "vocab.txt"), str(tmp_path / "tr.txt"),
              str(tmp_path / "te.txt"))
    assert (tmp_path / "tr.txt").read_text() == "0 1 2\n1 2\n2 0\n"
    convert = load_script("convert_format")
    tsv = tmp_path / "split.tsv"
    tsv.write_bytes(TSV.replace("\n", "\r").encode())
    assert convert.convert(str(tsv), str(tmp_path / "converted.txt")) == (29, 87)
    preprocess = load_script("preprocess")
    raw = b"".join(b"%d,2014-04-07T10:%02d:09.277Z,%d,0\r" % (s, k, 214536500 + k % 2) for s in range(1, 4)
                   for k in range(3))
    blocks = list(preprocess.iter_blocks(__import__("io").BytesIO(raw), 50))
    assert sum(block.count(b"\n") for _, block in blocks) == 9


def test_data_with_no_trainable_session_stops_before_saving(tmp_path, capsys):
    config = make_workspace(tmp_path)
    for name in ("data/train/sessions.txt",):
        (tmp_path / name).write_text("".join(f"{i}\n" for i in range(N_ITEMS)))  # one click each
    proc = Run(capsys, ["-m", config])
    assert_one_clean_error(proc, 2, "data error", "nothing to train on")
    assert checkpoint_epochs(tmp_path / "ckpt") == []


def test_cr_only_training_data_trains_every_session(tmp_path, capsys, caplog):
    config = make_workspace(tmp_path)
    path = tmp_path / "data" / "train" / "sessions.txt"
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\r".join(lines) + b"\r")
    with caplog.at_level("INFO"):
        proc = Run(capsys, ["-m", config, "-o", "runner.train.epochs=1"])
    assert proc.returncode == 0, proc.stderr
    assert f"{len(lines)} sessions" in caplog.text


def test_an_evaluation_with_no_target_warns(trained, tmp_path, capsys, caplog):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    shutil.copy(trained / "vocab.txt", tmp_path / "vocab.txt")
    write_sessions(str(tmp_path / "data" / "train" / "sessions.txt"), [[0, 1]])
    write_sessions(str(tmp_path / "data" / "test" / "sessions.txt"), [[i] for i in range(5)])
    config = write_config(tmp_path, base_config(vocab=True))
    with caplog.at_level("INFO"):
        proc = Run(capsys, ["-m", config, "-o", "mode=infer"])
    assert proc.returncode == 0, proc.stderr
    assert [r for r in caplog.records if r.levelname == "WARNING" and "0 targets" in r.getMessage()]


def test_a_bom_in_vocab_txt_is_not_part_of_the_first_label(tmp_path):
    labels = ["214536502", "214536503", "214536504"]
    (tmp_path / "vocab.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(labels).encode() + b"\n")
    write_sessions(str(tmp_path / "data" / "s.txt"), [[0, 1, 2]])
    reader = rsc15_reader.Reader(str(tmp_path / "data"), str(tmp_path / "vocab.txt"))
    assert reader.labels == labels
    # and in a session file, where the BOM would otherwise be a bad character
    (tmp_path / "data" / "s.txt").write_bytes(b"\xef\xbb\xbf0 1 2\n")
    assert rsc15_reader.Reader(str(tmp_path / "data")).n_queries == 1


@pytest.mark.parametrize("huge", [str(INT64_MAX + 1), "99999999999999999999", "1" + "0" * 40])
def test_a_huge_id_is_reported_as_itself(huge, tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(f"1 2 3\n4 {huge} 5\n")
    with pytest.raises(DataError) as refused:
        rsc15_reader.read_session_file(str(path), None)
    assert huge in str(refused.value) and f"{path}:2" in str(refused.value)
    convert = load_script("convert_format")
    tsv = tmp_path / "split.tsv"
    tsv.write_text(f"SessionId\tItemId\tTime\n1\t5\t1.0\n1\t{huge}\t2.0\n")
    with pytest.raises(convert.DataError) as refused:
        convert.convert(str(tsv), str(tmp_path / "out.txt"))
    assert huge in str(refused.value) and ":3" in str(refused.value)
    preprocess = load_script("preprocess")
    with pytest.raises(preprocess.RowError, match=huge):
        preprocess.parse_row(f"1,2014-04-07T10:51:09.277Z,{huge},0".encode())


def test_a_non_utf8_byte_in_a_split_is_reported_on_its_line(tmp_path):
    convert = load_script("convert_format")
    tsv = tmp_path / "split.tsv"
    tsv.write_bytes(b"SessionId\tItemId\tTime\n1\t5\t1.0\n1\t6\t2.0\n2\t\xe97\t3.0\n")
    with pytest.raises(convert.DataError) as refused:
        convert.convert(str(tsv), str(tmp_path / "out.txt"))
    assert f"{tsv}:4" in str(refused.value)
    assert not (tmp_path / "out.txt").exists()


def test_the_largest_id_that_fits_is_read_as_itself(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(f"1 {INT64_MAX}\n")
    assert rsc15_reader.read_session_file(str(path), None).items.tolist() == [1, INT64_MAX]


@pytest.mark.parametrize("where", ["in the folder", "as data_path"])
def test_a_dangling_symlink_is_reported_as_such(where, tmp_path):
    folder = tmp_path / "data"
    write_sessions(str(folder / "a.txt"), [[0, 1]])
    link = folder / "b.txt" if where == "in the folder" else tmp_path / "link"
    os.symlink(str(tmp_path / "gone.txt"), str(link))
    with pytest.raises(DataError) as refused:
        rsc15_reader.list_data_files(str(folder if where == "in the folder" else link))
    assert "symbolic link" in str(refused.value) and "gone.txt" in str(refused.value)
    assert "hidden" not in str(refused.value)


# ---- SIGTERM: a clean stop, exit 143 ------------------------------------------------------------

def test_sigterm_stops_training_cleanly_at_a_seeded_moment(tmp_path, test_seed):
    """SIGTERM at a moment drawn from the printed seed, once checkpoints are being written: one
    line naming the newest complete checkpoint, exit 143, every checkpoint complete, no temporary."""
    rng = np.random.default_rng(test_seed)
    make_workspace(tmp_path, vocab=True)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    log = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([PYTHON, "-m", "paddlerec.run", "--no-progress", "-m", str(tmp_path), "-o",
                             "runner.train.epochs=300"], stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=REPO)
    try:
        wait_until = int(rng.integers(1, 4))
        meta = tmp_path / "ckpt" / str(wait_until) / "meta.json"
        deadline = time.monotonic() + 300  # only bounds a hang
        while not meta.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.4)))  # anywhere in the next epoch or its save
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        err = log.read()
        log.close()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "C++" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    epochs = checkpoint_epochs(tmp_path / "ckpt")
    assert last.startswith("terminated (SIGTERM)") and str(tmp_path / "ckpt" / str(epochs[-1])) in last, last
    assert epochs == list(range(1, epochs[-1] + 1))
    for epoch in epochs:
        path = str(tmp_path / "ckpt" / str(epoch))
        meta = checkpoint.read_meta(path)
        for name in ("model.pdparams", "optimizer.pdopt"):
            checkpoint.verify_file(path, name, meta)
    assert not leftovers(tmp_path / "ckpt"), leftovers(tmp_path / "ckpt")


def test_sigterm_stops_a_data_script_without_a_partial_output(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for s in range(200_000):
            f.write(f"{s % 5000} {(s * 7) % 5000} {(s * 13) % 5000}\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([PYTHON, os.path.join(DATA_DIR, "text2paddle.py"), "--out-dir", str(out), "--train",
                             str(big), "--test", str(big)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.monotonic() + 120  # only bounds a hang
    while not (out / "all_train").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip("the script finished before the signal arrived")
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert folder_listing(out) == [], folder_listing(out)


# ---- the documented messages ---------------------------------------------------------------------

def test_readme_lists_the_new_messages():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    for fragment in ("appears twice", "alias bomb", "not UTF-8 text", "must be a finite number", "sha256 differs",
                     "nothing to train on", "0 targets", "symbolic link", "terminated (SIGTERM)", "143"):
        assert fragment in readme, fragment


def test_sigterm_swallowed_where_python_ignores_exceptions_still_ends_the_run():
    """A SIGTERM whose handler runs inside a weakref callback (matplotlib drawing the curves) is
    printed as "Exception ignored" by Python; termination.check(), which the loops call between
    batches, must still raise it."""
    import gc
    import weakref

    from paddlerec import termination

    class Thing:
        pass

    def callback(_ref):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes: the handler runs here, inside the callback
            pass

    with termination.sigterm_raises():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        gc.collect()
        assert ref() is None
        with pytest.raises(termination.Terminated):
            termination.check()
