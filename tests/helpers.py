"""Small builders shared by the tests (tiny datasets, models, configs)."""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
RSC15_100K = os.path.join(SHARED_DATA, "rsc15_sessionrec_100k")
PYTHON = sys.executable


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


def run_cli(args, cwd=REPO, timeout=300, env=None):
    """Run `python -m paddlerec.run ...` (or another module) as a user would; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=REPO)
    full_env.update(env or {})
    return subprocess.run([PYTHON] + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def write_sessions(path, sessions_list):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for s in sessions_list:
            f.write(" ".join(str(i) for i in s) + "\n")
