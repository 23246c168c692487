"""RSC15 session reader: session files -> session-parallel mini-batches.

Input format (what data/text2paddle.py writes, and the shipped sample data): one session
per line, its item ids (model ids, 0-based) separated by spaces, sessions in the order of
their first click — the order in which training plays them.

Session-parallel mini-batches (the GRU4Rec scheme; the same path serves training and
evaluation, so item ids and ordering can never drift between the two):
  * each of B slots plays one session; at every step a slot's current item is the input
    and its next item the target;
  * when a slot's session has no next item left, the slot takes the next unplayed session
    and its hidden state starts from zero (`carry == -1`);
  * when no session is left, the slot is dropped: the mini-batch shrinks at the end.
No backpropagation through time: a step only sees the hidden state handed over by the
previous step.
"""

import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np

from paddlerec.contract import DataInfo
from paddlerec.errors import DataError
from paddlerec.files import looks_temporary
from paddlerec.vocab import read_vocab

log = logging.getLogger(__name__)

_BAD_CHAR = re.compile(rb"[^0-9 \t\r\n]")


@dataclass
class Sessions:
    """Sessions as one flat item array: session s is items[offsets[s]:offsets[s+1]]."""

    items: np.ndarray  # int64 [n_events]
    offsets: np.ndarray  # int64 [n_sessions + 1]

    @property
    def n_sessions(self):
        return len(self.offsets) - 1

    @property
    def lengths(self):
        return np.diff(self.offsets)


@dataclass
class StepBatch:
    """Consecutive session-parallel steps (mini-batches), flattened.

    Step s owns rows step_offsets[s] .. step_offsets[s+1]; every row is one slot.
    """

    step_offsets: np.ndarray  # int64 [n_steps + 1]
    inputs: np.ndarray  # int64 [rows]: item clicked now
    targets: np.ndarray  # int64 [rows]: next item; -1 = the session ended (evaluation only)
    carry: np.ndarray  # int64 [rows]: row of the previous step whose hidden state continues here; -1 = zero state
    sessions: np.ndarray  # int64 [rows]: session (line) each row plays

    @property
    def n_steps(self):
        return len(self.step_offsets) - 1

    @property
    def step_events(self):
        """Real (input, next click) pairs per step."""
        valid = (self.targets >= 0).astype(np.int64)
        return np.add.reduceat(valid, self.step_offsets[:-1]) if len(valid) else np.zeros(0, np.int64)

    def head(self, n_steps):
        """The first n_steps mini-batches (carry indices stay valid: they point into the step before)."""
        rows = int(self.step_offsets[n_steps])
        return StepBatch(self.step_offsets[:n_steps + 1], self.inputs[:rows], self.targets[:rows],
                         self.carry[:rows], self.sessions[:rows])

    def part(self, first, stop):
        """Mini-batches first .. stop-1 as a batch of their own. Carry indices stay valid: they
        point into the step before, whose hidden state the model carries from its previous call."""
        lo, hi = int(self.step_offsets[first]), int(self.step_offsets[stop])
        return StepBatch(self.step_offsets[first:stop + 1] - lo, self.inputs[lo:hi], self.targets[lo:hi],
                         self.carry[lo:hi], self.sessions[lo:hi])

    def step(self, s):
        lo, hi = self.step_offsets[s], self.step_offsets[s + 1]
        return self.inputs[lo:hi], self.targets[lo:hi], self.carry[lo:hi], self.sessions[lo:hi]


def _shown(names):
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def list_data_files(data_path: str) -> List[str]:
    """The files a dataset reads: the file itself, or a folder's visible regular files, sorted.

    Skipped: hidden names (every writer of this project writes under a hidden temporary name,
    see paddlerec/files.py), sub-folders, and files named like another writer's temporary
    (`train.txt.tmp1234`): an interrupted run's partial data must never be trained on. A
    symbolic link whose target is gone is an error: a data file is missing."""
    if os.path.islink(data_path) and not os.path.exists(data_path):
        raise DataError(f"a symbolic link to {os.readlink(data_path)}, which does not exist; fix the link", data_path)
    if os.path.isfile(data_path):
        return [data_path]
    if not os.path.isdir(data_path):
        raise DataError("no such file or folder", data_path)
    files, skipped, partial = [], [], []
    try:
        names = sorted(os.listdir(data_path))
    except OSError as exc:
        raise DataError(f"cannot read the folder: {exc.strerror}; check its permissions", data_path) from None
    for name in names:
        full = os.path.join(data_path, name)
        if name.startswith("."):
            skipped.append(name)
        elif os.path.islink(full) and not os.path.exists(full):
            raise DataError(f"a symbolic link to {os.readlink(full)}, which does not exist; fix or remove the link",
                            full)
        elif looks_temporary(name):
            partial.append(name)
        elif not os.path.isfile(full):
            skipped.append(name)
        else:
            files.append(full)
    if skipped:
        log.info("%s: skipped %d hidden file(s) or sub-folder(s): %s", data_path, len(skipped), _shown(skipped))
    if partial:
        log.warning("%s: skipped %d file(s) an interrupted write left (delete them): %s", data_path, len(partial),
                    _shown(partial))
    if not files:
        raise DataError("the folder holds no data files; put session files in it (one session per line)", data_path)
    return files


def load_vocab(path: str) -> List[str]:
    """vocab.txt: one original item id per line; line number (0-based) = model id."""
    return read_vocab(path)


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


UTF8_BOM = b"\xef\xbb\xbf"
INT64_MAX = 2**63 - 1


def normalise_text(data: bytes) -> bytes:
    """Session bytes with a leading UTF-8 byte-order mark dropped and every line end (\\r\\n, or a
    lone \\r as old Mac tools write) made \\n: the line, not the byte, ends a session."""
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data


_LONG_NUMBER = re.compile(rb"[0-9]{19,}")  # int64 holds every number of up to 18 digits


def _too_large(data: bytes):
    """(line number, token) of the first id beyond int64, or None."""
    for match in _LONG_NUMBER.finditer(data):
        if int(match.group()) > INT64_MAX:
            return _line_of(data, match.start()), match.group().decode("ascii")
    return None


def read_session_file(path: str, n_items: Optional[int]) -> Sessions:
    """Parse one session file; every token must be an item id in [0, n_items)."""
    try:
        with open(path, "rb") as f:
            data = normalise_text(f.read())
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", path) from None
    bad = _BAD_CHAR.search(data)
    if bad:
        line_no = _line_of(data, bad.start())
        line = data.split(b"\n")[line_no - 1]
        token = next((t for t in line.split() if _BAD_CHAR.search(t + b" ")), line[:20])
        raise DataError(f"{token.decode('utf-8', 'replace')!r} is not an item id (non-negative integers "
                        f"separated by spaces expected)", path, line_no)
    lines = data.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    lengths = np.fromiter(map(len, map(bytes.split, lines)), dtype=np.int64, count=len(lines))
    huge = _too_large(data)
    if huge:
        raise DataError(f"item id {huge[1]} is larger than any model id can be (at most {INT64_MAX}); "
                        f"were original ids written here? Map them with data/text2paddle.py", path, huge[0])
    flat = data.translate(bytes.maketrans(b"\n\t", b"  "))
    items = np.fromstring(flat.decode("ascii"), dtype=np.int64, sep=" ") if lengths.sum() else np.zeros(0, np.int64)
    if items.size != lengths.sum():
        raise DataError("could not parse every item id", path)
    if n_items is not None and items.size and items.max() >= n_items:
        pos = int(np.argmax(items >= n_items))
        line_no = int(np.searchsorted(np.cumsum(lengths), pos, side="right")) + 1
        raise DataError(f"item id {items[pos]} is outside the vocab ({n_items} items, ids 0..{n_items - 1}); "
                        f"was this file made with another vocab.txt?", path, line_no)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Sessions(items, offsets)


# Without a vocab the model holds a row for every id up to the largest one. Past this many rows,
# ids of which only a small fraction occur are original ids (RSC15's look like 214536502) fed
# without data/text2paddle.py: the model would need gigabytes for nothing.
SPARSE_ID_ROWS = 1_000_000
SPARSE_ID_RATIO = 20


def check_dense_ids(paths: List[str], parts: List[Sessions]) -> None:
    largest = max((int(p.items.max()), i) for i, p in enumerate(parts) if p.items.size)
    n_rows = largest[0] + 1
    if n_rows <= SPARSE_ID_ROWS:
        return
    distinct = len(np.unique(np.concatenate([p.items for p in parts])))
    if n_rows <= SPARSE_ID_RATIO * distinct:
        return
    part = parts[largest[1]]
    pos = int(np.argmax(part.items))
    line = int(np.searchsorted(part.offsets, pos, side="right"))
    raise DataError(f"item id {largest[0]} asks for a model of {n_rows:,} items, but only {distinct:,} distinct ids "
                    f"occur: these look like original item ids. Map them to 0..n-1 with data/text2paddle.py "
                    f"(sh data_prepare.sh does it) and set the dataset's vocab_path", paths[largest[1]], line)


def drop_short(sessions: Sessions, min_length: int, what: Optional[str]) -> Sessions:
    """Remove sessions shorter than min_length; `what` names the data in the warning (None: no warning)."""
    lengths = sessions.lengths
    keep = lengths >= min_length
    n_short = int((~keep & (lengths > 0)).sum())
    if n_short and what:
        log.warning("%s: ignored %d session(s) shorter than %d click(s): they hold no next-click target",
                    what, n_short, min_length)
    if keep.all():
        return sessions
    items = sessions.items[np.repeat(keep, lengths)]
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=offsets[1:])
    return Sessions(items, offsets)


def concat_sessions(parts: List[Sessions]) -> Sessions:
    items = np.concatenate([p.items for p in parts]) if parts else np.zeros(0, np.int64)
    lengths = np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Sessions(items, offsets)


def session_parallel_steps(sessions: Sessions, batch_size: int, with_final: bool) -> Iterator[StepBatch]:
    """Yield blocks of session-parallel steps; between blocks, slots switch sessions.

    A block is the run of steps until the first slot's session ends (every slot stays on
    its session for the whole block), so each block is built with a few array operations.
    with_final: also play a session's last click, with target -1, so that the state after
    the whole session is available (for recommendations at evaluation time).
    """
    n_sessions = sessions.n_sessions
    if n_sessions == 0:
        return
    offsets, items = sessions.offsets, sessions.items
    shortest = 1 if with_final else 2
    if sessions.lengths.min() < shortest:
        raise ValueError(f"sessions must hold at least {shortest} clicks here; drop shorter ones first")
    n_slots = min(batch_size, n_sessions)
    slot_session = np.arange(n_slots, dtype=np.int64)
    pos = offsets[slot_session].copy()  # index of each slot's current input click
    end = offsets[slot_session + 1].copy()
    next_session = n_slots
    carry_first = np.full(n_slots, -1, dtype=np.int64)
    extra = 1 if with_final else 0
    while len(slot_session):
        steps_left = end - pos - 1 + extra  # steps each slot can still play on its session
        n_steps = int(steps_left.min())
        n = len(slot_session)
        idx = pos[None, :] + np.arange(n_steps, dtype=np.int64)[:, None]  # [n_steps, n]
        inputs = items[idx]
        has_next = idx + 1 < end[None, :]
        targets = np.where(has_next, items[np.minimum(idx + 1, len(items) - 1)], -1)
        carry = np.tile(np.arange(n, dtype=np.int64), (n_steps, 1))
        carry[0] = carry_first
        yield StepBatch(
            step_offsets=np.arange(n_steps + 1, dtype=np.int64) * n,
            inputs=inputs.reshape(-1), targets=targets.reshape(-1), carry=carry.reshape(-1),
            sessions=np.tile(slot_session, n_steps))
        pos += n_steps
        finished = (end - pos - 1 + extra) <= 0
        # finished slots take the next sessions, lowest slot first; the rest are dropped
        finished_slots = np.flatnonzero(finished)
        n_new = min(len(finished_slots), n_sessions - next_session)
        refill = finished_slots[:n_new]
        new_sessions = np.arange(next_session, next_session + n_new, dtype=np.int64)
        next_session += n_new
        slot_session[refill] = new_sessions
        pos[refill] = offsets[new_sessions]
        end[refill] = offsets[new_sessions + 1]
        keep = ~finished
        keep[refill] = True
        kept = np.flatnonzero(keep)
        carry_first = np.where(finished[kept], -1, kept)
        slot_session, pos, end = slot_session[kept], pos[kept], end[kept]


def chunk_steps(blocks: Iterator[StepBatch], min_steps: int) -> Iterator[StepBatch]:
    """Merge consecutive blocks into batches of at least `min_steps` steps (fewer calls per epoch)."""
    pending: List[StepBatch] = []
    count = 0
    for block in blocks:
        pending.append(block)
        count += block.n_steps
        if count >= min_steps:
            yield merge(pending)
            pending, count = [], 0
    if pending:
        yield merge(pending)


def with_target_lists(batch: StepBatch) -> StepBatch:
    """The batch plus, in every step, a twin of each row that has a target: same input and
    carried state, target -1 (recommend) and query id -1 - session, so the model returns the
    top-K list it recommends at that click (Coverage@K and Popularity@K are computed over these
    lists). Twins follow the step's own rows, so the carry indices of the next step, which point
    at the own rows, stay valid; a twin's state is never carried on."""
    n_rows = np.diff(batch.step_offsets)
    step_of_row = np.repeat(np.arange(batch.n_steps, dtype=np.int64), n_rows)
    twin = np.flatnonzero(batch.targets >= 0)
    # order: step by step, own rows first (in order), then that step's twins (in order)
    key = np.concatenate([2 * step_of_row, 2 * step_of_row[twin] + 1])
    order = np.argsort(key, kind="stable")
    rows_per_step = n_rows + np.bincount(step_of_row[twin], minlength=batch.n_steps)
    step_offsets = np.zeros(batch.n_steps + 1, dtype=np.int64)
    np.cumsum(rows_per_step, out=step_offsets[1:])
    joined = lambda own, twins: np.concatenate([own, twins])[order]
    return StepBatch(step_offsets=step_offsets,
                     inputs=joined(batch.inputs, batch.inputs[twin]),
                     targets=joined(batch.targets, np.full(len(twin), -1, dtype=np.int64)),
                     carry=joined(batch.carry, batch.carry[twin]),
                     sessions=joined(batch.sessions, -1 - batch.sessions[twin]))


def merge(parts: List[StepBatch]) -> StepBatch:
    if len(parts) == 1:
        return parts[0]
    rows = np.cumsum([0] + [len(p.inputs) for p in parts[:-1]])
    step_offsets = np.concatenate([p.step_offsets[:-1] + r for p, r in zip(parts, rows)] +
                                  [np.array([rows[-1] + len(parts[-1].inputs)], dtype=np.int64)])
    return StepBatch(step_offsets=step_offsets,
                     inputs=np.concatenate([p.inputs for p in parts]),
                     targets=np.concatenate([p.targets for p in parts]),
                     carry=np.concatenate([p.carry for p in parts]),
                     sessions=np.concatenate([p.sessions for p in parts]))


class Reader:
    """Reads a dataset of session files (see the module docstring) and makes its batches."""

    STEPS_PER_BATCH = 64  # session-parallel steps handed to the model per call

    def __init__(self, data_path: str, vocab_path: str = ""):
        self.data_path = data_path
        self.labels = load_vocab(vocab_path) if vocab_path else None
        n_items = len(self.labels) if self.labels is not None else None
        paths = list_data_files(data_path)
        parts = [read_session_file(path, n_items) for path in paths]
        self.sessions = concat_sessions(parts)
        if self.sessions.items.size == 0:
            raise DataError("no sessions in the data (the files are empty)", data_path)
        if n_items is None:
            check_dense_ids(paths, parts)
        self._n_items = n_items if n_items is not None else int(self.sessions.items.max()) + 1

    @property
    def n_queries(self):
        return self.sessions.n_sessions

    def info(self) -> DataInfo:
        support = np.bincount(self.sessions.items, minlength=self._n_items).astype(np.int64)
        return DataInfo(n_items=self._n_items, item_support=support, labels=self.labels)

    def restricted(self, known_items: Optional[np.ndarray]) -> Sessions:
        """Sessions without the clicks on items the model does not know (counted in the log)."""
        sessions = self.sessions
        if known_items is None:
            return sessions
        items = sessions.items
        in_range = items < len(known_items)
        known = np.zeros(len(items), dtype=bool)
        known[in_range] = known_items[items[in_range]]
        n_unknown = int((~known).sum())
        if n_unknown == 0:
            return sessions
        log.info("%s: dropped %d of %d clicks on items unseen in training (%.2f%%)", self.data_path,
                 n_unknown, len(items), 100.0 * n_unknown / len(items))
        session_of_click = np.repeat(np.arange(sessions.n_sessions), sessions.lengths)
        lengths = np.bincount(session_of_click[known], minlength=sessions.n_sessions).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Sessions(items[known], offsets)

    def batches(self, batch_size: int, training: bool, known_items: Optional[np.ndarray] = None,
                shard=(0, 1), recommend: bool = True, target_lists: bool = False) -> Iterator[StepBatch]:
        """Session-parallel batches. Training needs 2+ clicks per session; evaluation with
        `recommend` also plays a session's last click (target -1) so its recommendations can be
        read off (without it, evaluation only ranks targets, as the official evaluation does).
        Evaluation with `target_lists` also asks for the list recommended at every target
        (see with_target_lists: query id -1 - session)."""
        sessions = self.restricted(known_items)
        if training and not (sessions.lengths >= 2).any():
            raise DataError("no session has 2 or more clicks, so there is nothing to train on (a session's "
                            "next click is the target); check the data, e.g. its line ends", self.data_path)
        ids = np.arange(sessions.n_sessions, dtype=np.int64)  # a row's session = its line in the data
        rank, world = shard
        if world > 1:
            which = np.arange(rank, sessions.n_sessions, world)
            sessions, ids = select_sessions(sessions, which), ids[which]
        with_final = recommend and not training
        shortest = 1 if with_final else 2
        ids = ids[sessions.lengths >= shortest]
        sessions = drop_short(sessions, shortest, self.data_path if training else None)
        blocks = session_parallel_steps(sessions, batch_size, with_final=with_final)
        for batch in chunk_steps(blocks, self.STEPS_PER_BATCH):
            batch.sessions = ids[batch.sessions]
            yield with_target_lists(batch) if target_lists and not training else batch


def select_sessions(sessions: Sessions, which: np.ndarray) -> Sessions:
    lengths = sessions.lengths[which]
    starts = sessions.offsets[which]
    offsets = np.zeros(len(which) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Sessions(sessions.items[idx], offsets)
