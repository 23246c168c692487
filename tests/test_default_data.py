"""The shipped data: the generated default sessions (data/generate.py) and PaddleRec's original
sample files (data/sample_paddlerec/), which must still load."""

import importlib.util
import os

import numpy as np
import pytest

from tests.helpers import REPO

GENERATOR = os.path.join(REPO, "data", "generate.py")


def load_generator():
    spec = importlib.util.spec_from_file_location("data_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path):
    with open(path, encoding="ascii") as f:
        return f.read()


def test_generator_is_deterministic_and_the_seed_matters():
    gen = load_generator()
    first = gen.generate(seed=7, n_items=200, n_train=300, n_test=60)
    again = gen.generate(seed=7, n_items=200, n_train=300, n_test=60)
    other = gen.generate(seed=8, n_items=200, n_train=300, n_test=60)
    assert first == again, "seed 7 gave two different data sets"
    assert first[0] != other[0], "seeds 7 and 8 gave the same training sessions"


def test_shipped_files_are_the_generator_output_with_its_defaults(tmp_path):
    gen = load_generator()
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    for split in ("train", "test"):
        shipped = os.path.join(REPO, "data", split, "sessions.txt")
        assert read(tmp_path / split / "sessions.txt") == read(shipped), \
            f"data/{split}/sessions.txt is not `python data/generate.py`'s output; regenerate it"
    assert gen.main(["--out-dir", str(tmp_path)]) == 0  # safe to run twice
    assert sorted(os.listdir(tmp_path / "train")) == ["sessions.txt"]


def test_generated_sessions_have_targets_and_real_structure():
    gen = load_generator()
    train, test, counts = gen.generate()
    seen = {item for session in train for item in session}
    assert all(len(s) >= 2 for s in train + test)
    assert all(item in seen for session in test for item in session), "a test click on an item unseen in training"
    assert counts["test_targets"] == sum(len(s) - 1 for s in test) >= 2000
    lengths = np.array([len(s) for s in train])
    assert 0.35 < np.mean(lengths == 2) < 0.5 and 3.5 < lengths.mean() < 4.6  # RSC15: 43% and 3.95
    clicks = np.bincount(np.concatenate([np.array(s) for s in train]))
    top20_share = np.sort(clicks)[::-1][:20].sum() / clicks.sum()
    assert 0.08 < top20_share < 0.3, top20_share  # heavy-tailed, not a few items only
    # transitions: the most frequent successor of an item follows it far more often than its popularity says
    pairs = np.array([(a, b) for s in train for a, b in zip(s, s[1:]) if a != b])
    item = int(np.argmax(np.bincount(pairs[:, 0])))
    after = np.bincount(pairs[pairs[:, 0] == item, 1], minlength=len(clicks))
    assert after.max() / after.sum() > 5 * clicks[np.argmax(after)] / clicks.sum()


def test_generator_rejects_bad_arguments(capsys):
    gen = load_generator()
    assert gen.main(["--items", "10"]) == 2
    assert "error: --items must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("split,sessions", [("train", 100), ("test", 100)])
def test_paddlerec_sample_still_loads(split, sessions):
    spec = importlib.util.spec_from_file_location("rsc15_reader_sample", os.path.join(REPO, "rsc15_reader.py"))
    reader_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader_module)
    reader = reader_module.Reader(os.path.join(REPO, "data", "sample_paddlerec", split))
    assert reader.n_queries == sessions
    batches = list(reader.batches(8, training=True))
    assert sum(int(b.step_events.sum()) for b in batches) == int(reader.sessions.lengths.sum()) - sessions + \
        int((reader.sessions.lengths < 2).sum())  # sessions of one click hold no event and are skipped
