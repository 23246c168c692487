"""What the tests share: tiny data sets, models and workspaces, and running the commands.

A workspace (make_workspace) is a self-contained folder with session files, a vocab and a
config.yaml pointing at the repository's model.py and rsc15_reader.py, so the tests run the
real code; everything a run writes goes under the test's tmp folder.
"""

import copy
import os
import re
import subprocess
import sys

import numpy as np
import yaml

from paddlerec.errors import line_prefixes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
RSC15_100K = os.path.join(SHARED_DATA, "rsc15_sessionrec_100k")
PYTHON = sys.executable


# ---- commands, as a user runs them -------------------------------------------------------------

def run_cli(args, cwd=None, timeout=600, env=None):
    """`python ARGS` in a fresh process with this repository importable (e.g. ["-m", "paddlerec.serve", ...]);
    returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    full_env.update(env or {})
    return subprocess.run([PYTHON] + list(args), cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def run_paddlerec(args, cwd=None, timeout=600):
    """`python -m paddlerec.run --no-progress ARGS`."""
    return run_cli(["-m", "paddlerec.run", "--no-progress"] + list(args), cwd=cwd, timeout=timeout)


# The prefixes an entry point prints before an error's message ("config error: ...")
ERROR_LINE = re.compile(r"^(" + "|".join(re.escape(p) for p in line_prefixes()) + r"): ", re.M)


def error_lines(stderr):
    """The lines paddlerec.run printed for a UserError (there must be exactly one)."""
    return [line for line in stderr.splitlines() if ERROR_LINE.match(line)]


def assert_one_clean_error(proc, code, *fragments):
    """Exit code `code`, no traceback, exactly one error line, holding every fragment; returns the line."""
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"expected one error line, got {lines!r} in:\n{proc.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def checkpoint_epochs(root):
    """Epoch numbers of the complete checkpoints under root (digit folders with meta.json)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isfile(os.path.join(root, n, "meta.json")))


def leftovers(root):
    """Temporary or half-replaced folders a save left behind."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".old-")) or ".tmp-" in n)


# ---- workspaces: data files, a vocab and a config -------------------------------------------------

N_ITEMS = 40
# Small settings so that an epoch takes milliseconds; the real model and reader still run.
SMALL_HPARAMS = {
    "layers": [12],
    "n_sample": 16,
    "sample_store": 4096,
    "dropout_hidden": 0.1,
    "logq": 1.0,
    "optimizer": {"class": "adagrad", "learning_rate": 0.1, "momentum": 0.2},
    "seed": 7,
    # Paddle operators: loading the fused C++ operator costs seconds per process, and these tests
    # are about the runners; config.yaml's run and the NaN tests exercise the fused kernel.
    "kernel": "reference",
}


def session_lists(n_sessions, n_items, seed, min_len=2, max_len=7):
    """Random sessions (lists of item ids 0..n_items-1), every item appearing at least once."""
    rng = np.random.default_rng(seed)
    sessions = [list(rng.integers(0, n_items, rng.integers(min_len, max_len + 1))) for _ in range(n_sessions)]
    for item in range(n_items):  # so that every item is known to a model trained on them
        sessions[item % n_sessions].append(item)
    return [[int(i) for i in s] for s in sessions]


def write_sessions(path, sessions):
    """One session per line, item ids separated by spaces."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in sessions:
            f.write(" ".join(str(i) for i in s) + "\n")


def labels(n_items):
    """Original item ids, as RSC15 has them: large numbers unrelated to the model ids."""
    return [str(214500000 + 37 * i) for i in range(n_items)]


def base_config(vocab=False):
    hp = copy.deepcopy(SMALL_HPARAMS)
    vocab_path = "{workspace}/vocab.txt" if vocab else ""
    return {
        "workspace": ".",
        "dataset": [
            {"name": "train_data", "batch_size": 8, "type": "DataLoader", "data_path": "{workspace}/data/train",
             "data_converter": os.path.join(REPO, "rsc15_reader.py"), "vocab_path": vocab_path},
            {"name": "test_data", "batch_size": 16, "type": "DataLoader", "data_path": "{workspace}/data/test",
             "data_converter": os.path.join(REPO, "rsc15_reader.py"), "vocab_path": vocab_path},
        ],
        "hyper_parameters": hp,
        "mode": ["train"],
        "runner": [
            {"name": "train", "class": "train", "device": "cpu", "epochs": 2, "save_checkpoint_interval": 1,
             "save_checkpoint_path": "{workspace}/ckpt", "save_inference_interval": 0, "print_interval": 10,
             "phases": ["phase_train"]},
            {"name": "resume", "class": "train", "device": "cpu", "epochs": 2, "save_checkpoint_interval": 1,
             "init_model_path": "{workspace}/ckpt", "save_checkpoint_path": "{workspace}/ckpt",
             "print_interval": 10, "phases": ["phase_train"]},
            {"name": "infer", "class": "infer", "device": "cpu", "init_model_path": "{workspace}/ckpt",
             "predictions_path": "{workspace}/pred", "topk": 5, "show_predictions": 2, "phases": ["phase_test"]},
        ],
        "phase": [
            {"name": "phase_train", "model": os.path.join(REPO, "model.py"), "dataset_name": "train_data",
             "thread_num": 1},
            {"name": "phase_test", "model": os.path.join(REPO, "model.py"), "dataset_name": "test_data",
             "thread_num": 1},
        ],
    }


def make_workspace(folder, config=None, vocab=False, n_train=120, n_test=40, seed=0):
    """Write data (and vocab.txt) and config.yaml under `folder`; returns the config path."""
    folder = str(folder)
    write_sessions(os.path.join(folder, "data", "train", "sessions.txt"), session_lists(n_train, N_ITEMS, seed))
    write_sessions(os.path.join(folder, "data", "test", "sessions.txt"), session_lists(n_test, N_ITEMS, seed + 1))
    if vocab:
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(labels(N_ITEMS)) + "\n")
    return write_config(folder, config if config is not None else base_config(vocab))


def write_config(folder, config, name="config.yaml"):
    path = os.path.join(str(folder), name)
    os.makedirs(str(folder), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def entry(config, section, name):
    """The list entry of `section` called `name` (to edit a config dict in place)."""
    return next(e for e in config[section] if e["name"] == name)


# ---- models and session data in memory ------------------------------------------------------------

def random_sessions(n_sessions, n_items, seed, min_len=2, max_len=7):
    """A rsc15_reader.Sessions of random clicks (item 0 .. n_items-1, popularity skewed)."""
    import rsc15_reader

    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n_sessions)
    weights = 1.0 / np.arange(1, n_items + 1)
    items = rng.choice(n_items, size=int(lengths.sum()), p=weights / weights.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return rsc15_reader.Sessions(items.astype(np.int64), offsets)


def steps_of(sessions, batch_size, with_final=False, chunk=7):
    import rsc15_reader

    return rsc15_reader.chunk_steps(rsc15_reader.session_parallel_steps(sessions, batch_size, with_final), chunk)


def hparams(**values):
    import model as model_module
    from paddlerec.params import validate_section

    return validate_section(values, model_module.HYPER_PARAMETERS, "hyper_parameters")


def make_model(sessions, n_items=None, **values):
    import model as model_module
    from paddlerec.contract import DataInfo

    n_items = n_items or int(sessions.items.max()) + 1
    support = np.bincount(sessions.items, minlength=n_items)
    return model_module.Model(hparams(**values), DataInfo(n_items=n_items, item_support=support))


def train_small_model(folder):
    """Train the small model of make_workspace (40 items, layers [12]) in this process: its
    checkpoints 1 and 2 end up in `folder`/ckpt. Returns `folder`."""
    from paddlerec.run import main

    path = make_workspace(folder, vocab=True)
    assert main(["-m", path, "--no-progress", "-q"]) == 0
    assert checkpoint_epochs(folder / "ckpt") == [1, 2]
    return folder
