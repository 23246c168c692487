"""A tiny, self-contained workspace for the runner tests: session files, a vocab and a config.

The config points at the repository's model.py and rsc15_reader.py, so the tests run the
real code; everything a run writes goes under the test's tmp folder.
"""

import copy
import os
import re
import subprocess
import sys

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

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


def run_cli(args, cwd=None, timeout=600):
    """`python -m paddlerec.run ARGS` in a fresh process, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([PYTHON, "-m", "paddlerec.run", "--no-progress"] + list(args), cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


ERROR_LINE = re.compile(r"^(config error|data error|checkpoint error|training error|save error|error): ", re.M)


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
