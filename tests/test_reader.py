"""rsc15_reader: parsing session files and the session-parallel mini-batches."""

import os

import numpy as np
import pytest

import rsc15_reader
from paddlerec.errors import DataError


def sessions_of(lists):
    lengths = [len(s) for s in lists]
    return rsc15_reader.Sessions(np.array([i for s in lists for i in s], np.int64),
                                 np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def all_steps(sessions, batch_size, with_final=False):
    steps = []
    for block in rsc15_reader.session_parallel_steps(sessions, batch_size, with_final):
        for s in range(block.n_steps):
            inputs, targets, carry, owners = block.step(s)
            steps.append((inputs.tolist(), targets.tolist(), carry.tolist(), owners.tolist()))
    return steps


def test_session_parallel_steps_by_hand():
    # A=[1,2,3] B=[4,5] C=[6,7,8,9] D=[10,11], two slots, worked out by hand:
    # slot 0 plays A then D, slot 1 plays B then C; when D ends no session is left and the batch
    # shrinks to the slot still playing C, whose state moves from row 1 to row 0.
    sessions = sessions_of([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]])
    assert all_steps(sessions, 2) == [
        ([1, 4], [2, 5], [-1, -1], [0, 1]),
        ([2, 6], [3, 7], [0, -1], [0, 2]),
        ([10, 7], [11, 8], [-1, 1], [3, 2]),
        ([8], [9], [1], [2]),
    ]


def test_session_parallel_steps_with_final_click():
    # evaluation also plays each session's last click (target -1) to read its recommendation
    sessions = sessions_of([[1, 2], [3], [4, 5, 6]])
    assert all_steps(sessions, 2, with_final=True) == [
        ([1, 3], [2, -1], [-1, -1], [0, 1]),
        ([2, 4], [-1, 5], [0, -1], [0, 2]),
        ([5], [6], [1], [2]),
        ([6], [-1], [0], [2]),
    ]


def test_every_click_is_played_once_in_order():
    rng = np.random.default_rng(0)
    lists = [list(rng.integers(0, 50, rng.integers(2, 9))) for _ in range(200)]
    sessions = sessions_of(lists)
    seen = {i: [] for i in range(len(lists))}
    previous_rows = None
    first_step_of = {}
    for step, (inputs, targets, carry, owners) in enumerate(all_steps(sessions, 7)):
        assert len(inputs) <= 7
        for row, (x, y, c, owner) in enumerate(zip(inputs, targets, carry, owners)):
            seen[owner].append((x, y))
            if c < 0:
                first_step_of.setdefault(owner, step)
                assert len(seen[owner]) == 1  # a zero state only at the session's first click
            else:
                assert previous_rows[c] == owner  # the state comes from the same session's last step
        previous_rows = owners
    for owner, pairs in seen.items():
        session = lists[owner]
        assert pairs == list(zip(session[:-1], session[1:]))
    # sessions start in file order (the order of their first click)
    starts = sorted(first_step_of, key=lambda o: (first_step_of[o], o))
    assert starts == sorted(starts)


def test_sessions_shorter_than_two_clicks_are_rejected_by_the_iterator():
    with pytest.raises(ValueError):
        list(rsc15_reader.session_parallel_steps(sessions_of([[1, 2], [3]]), 2, False))


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_reader_reads_a_folder_and_skips_hidden_files(tmp_path, caplog):
    write(tmp_path / "data" / "b.txt", "3 4 5\n")
    write(tmp_path / "data" / "a.txt", "1 2 \n6 7\n")
    write(tmp_path / "data" / ".DS_Store", "junk")
    os.makedirs(tmp_path / "data" / ".ipynb_checkpoints")
    with caplog.at_level("INFO"):
        reader = rsc15_reader.Reader(str(tmp_path / "data"))
    assert "skipped 2 hidden file(s) or sub-folder(s)" in caplog.text
    assert reader.sessions.items.tolist() == [1, 2, 6, 7, 3, 4, 5]
    info = reader.info()
    assert info.n_items == 8
    assert info.item_support.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]


def test_reader_errors_name_file_and_line(tmp_path):
    write(tmp_path / "bad.txt", "1 2 3\n4 x5 6\n")
    with pytest.raises(DataError, match=r"bad.txt:2: 'x5' is not an item id"):
        rsc15_reader.Reader(str(tmp_path / "bad.txt"))
    write(tmp_path / "vocab.txt", "a\nb\nc\n")
    write(tmp_path / "ok.txt", "0 1\n2 3\n")
    with pytest.raises(DataError, match=r"ok.txt:2: item id 3 is outside the vocab \(3 items"):
        rsc15_reader.Reader(str(tmp_path / "ok.txt"), str(tmp_path / "vocab.txt"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="holds no data files"):
        rsc15_reader.Reader(str(tmp_path / "empty"))


def test_evaluation_drops_unknown_items_and_keeps_line_numbers(tmp_path):
    write(tmp_path / "test.txt", "1 9 2\n9 9\n3 4\n")
    reader = rsc15_reader.Reader(str(tmp_path / "test.txt"))
    known = np.zeros(10, bool)
    known[[1, 2, 3, 4]] = True
    batches = list(reader.batches(4, training=False, known_items=known))
    rows = [(b.inputs.tolist(), b.targets.tolist(), b.sessions.tolist()) for b in batches]
    inputs = sum((r[0] for r in rows), [])
    targets = sum((r[1] for r in rows), [])
    owners = sum((r[2] for r in rows), [])
    # session 0 becomes [1, 2], session 1 vanishes, session 2 stays: line numbers are kept
    assert sorted(zip(owners, inputs, targets)) == [(0, 1, 2), (0, 2, -1), (2, 3, 4), (2, 4, -1)]



def reference_batches(lists, batch_size, with_final, min_steps):
    """The session-parallel schedule simulated step by step in plain Python, steps merged into
    batches as chunk_steps does: a batch ends at the first step, once it holds min_steps steps,
    at which some slot's session ends. Returns batches as lists of (input, target, carry, session)
    rows per step."""
    played = [len(clicks) - (0 if with_final else 1) for clicks in lists]
    slots = [[s, 0, -1] for s in range(min(batch_size, len(lists)))]  # session, clicks played, carry
    next_session = len(slots)
    batches, batch = [], []
    while slots:
        rows = []
        for row, (s, p, carry) in enumerate(slots):
            clicks = lists[s]
            rows.append((clicks[p], clicks[p + 1] if p + 1 < len(clicks) else -1, carry, s))
        batch.append(rows)
        continuing, session_ended = [], False
        for row, (s, p, _) in enumerate(slots):
            if p + 1 < played[s]:
                continuing.append([s, p + 1, row])
            else:
                session_ended = True
                if next_session < len(lists):  # lowest slot first: slots are visited in order
                    continuing.append([next_session, 0, -1])
                    next_session += 1
        slots = continuing
        if session_ended and (len(batch) >= min_steps or not slots):
            batches.append(batch)
            batch = []
    return batches


def as_rows(batch):
    return [list(zip(*(a.tolist() for a in batch.step(s)))) for s in range(batch.n_steps)]


def test_batches_match_a_step_by_step_simulation(monkeypatch):
    for seed in range(400):
        rng = np.random.default_rng(seed)
        with_final = bool(rng.integers(2))
        shortest = 1 if with_final else 2
        n_sessions = int(rng.integers(0, 60 if seed % 10 else 3000))
        longest = int(rng.choice([shortest, 3, 6, 30]))
        lists = [rng.integers(0, 1000, rng.integers(shortest, longest + 1)).tolist() for _ in range(n_sessions)]
        batch_size = int(rng.integers(1, n_sessions + 4))
        min_steps = int(rng.choice([1, 2, 7, 64]))
        # small rounds and tail blocks, so that blocks end inside batches and batches span blocks
        monkeypatch.setattr(rsc15_reader, "SESSIONS_PER_ROUND", int(rng.choice([1, 3, 8192])))
        monkeypatch.setattr(rsc15_reader, "TAIL_BLOCK_CELLS", int(rng.choice([1, 5, 32768])))
        case = f"seed {seed}: {n_sessions} sessions, batch_size {batch_size}, with_final {with_final}, " \
               f"min_steps {min_steps}"
        got = list(rsc15_reader.chunk_steps(
            rsc15_reader.session_parallel_steps(sessions_of(lists), batch_size, with_final), min_steps))
        expected = reference_batches(lists, batch_size, with_final, min_steps)
        assert len(got) == len(expected), case
        for i, (batch, steps) in enumerate(zip(got, expected)):
            assert batch.step_offsets.tolist() == np.cumsum([0] + [len(rows) for rows in steps]).tolist(), \
                f"{case}, batch {i}"
            assert as_rows(batch) == steps, f"{case}, batch {i}"
            for array in (batch.step_offsets, batch.inputs, batch.targets, batch.carry, batch.sessions):
                assert array.dtype == np.int64, f"{case}, batch {i}"
