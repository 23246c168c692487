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

import heapq
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


# Slots are assigned to sessions in rounds of this many sessions, and a block holds about the
# steps of one round: ~30k rows, so that a block's few dozen array operations cost little per step.
SESSIONS_PER_ROUND = 8192
# Once sessions run out, a block holds about this many (step, slot) cells.
TAIL_BLOCK_CELLS = 32768


def session_parallel_steps(sessions: Sessions, batch_size: int, with_final: bool) -> Iterator[StepBatch]:
    """Yield blocks of session-parallel steps; a block ends at a step where some slot's session
    ends (chunk_steps cuts batches only at such steps), slots may switch sessions inside a block.

    Slot assignment runs ahead of the steps: a session takes the slot that frees first, the lowest
    of those that free at the same step, which a heap of the slots' free steps gives at about
    0.2 us a session. Each block's rows are then placed with array operations over the whole block.
    with_final: also play a session's last click, with target -1, so that the state after
    the whole session is available (for recommendations at evaluation time).
    """
    n_sessions = sessions.n_sessions
    if n_sessions == 0:
        return
    shortest = 1 if with_final else 2
    if sessions.lengths.min() < shortest:
        raise ValueError(f"sessions must hold at least {shortest} clicks here; drop shorter ones first")
    session_steps = sessions.lengths - (0 if with_final else 1)  # int64 [n_sessions]: steps a session plays
    n_slots = min(batch_size, n_sessions)
    # A session's place is the key start_step * n_slots + slot: key order is (step, slot) order, the
    # order in which freed slots take new sessions. keys: int64 [hi - lo], of sessions lo .. hi-1,
    # which hold every session that still plays at step `done` (the first step not yielded yet).
    keys = np.arange(n_slots, dtype=np.int64)
    free = (session_steps[:n_slots] * n_slots + keys).tolist()  # the key at which each slot frees
    heapq.heapify(free)
    replace = heapq.heapreplace  # a local name: it is called once per session
    lo, hi, done = 0, n_slots, 0
    while True:
        if hi < n_sessions:
            stop = min(hi + SESSIONS_PER_ROUND, n_sessions)
            taken = [replace(free, free[0] + d) for d in (session_steps[hi:stop] * n_slots).tolist()]
            keys = np.concatenate([keys, np.array(taken, dtype=np.int64)])
            hi = stop
            # the sessions not assigned yet start at the last assigned one's step or later, so every
            # step before it has all its sessions
            known_until = taken[-1] // n_slots
        else:
            known_until = free[0] // n_slots  # the first step at which a slot has no session left to take
        start = keys // n_slots
        slot = keys - start * n_slots
        end = start + session_steps[lo:hi]
        block_end = int(end[end <= known_until].max(initial=done))  # blocks end where a session ends
        if block_end > done:
            yield _full_steps(sessions, n_slots, done, block_end, start, slot, end, lo, with_final)
            done = block_end
        if hi == n_sessions:
            break
        finished = int(np.argmax(end > done))  # sessions lo .. lo+finished-1 have all been played
        keys, lo = keys[finished:], lo + finished
    # from here on every slot plays one session, its last, and is dropped when it ends
    last = np.flatnonzero(end > done)
    last = last[np.argsort(slot[last])]
    yield from _tail_steps(sessions, done, start[last], end[last], lo + last, slot[last], with_final)


def _full_steps(sessions, n_slots, first_step, stop_step, start, slot, end, first_session, with_final):
    """Steps first_step .. stop_step-1, in which every slot plays: row = slot.

    start, slot, end: int64 [n] of sessions first_session .. first_session+n-1 (they hold every
    session playing in these steps), the session plays steps start .. end-1 on its slot."""
    n_steps = stop_step - first_step
    n_rows = n_steps * n_slots
    skipped = np.maximum(first_step - start, 0)  # steps played before this block
    count = np.maximum(np.minimum(end, stop_step) - start - skipped, 0)  # steps played in it
    # the block's events session by session; event e is the session's (e - first_event)-th in the block
    first_event = np.cumsum(count) - count
    event = np.arange(n_rows, dtype=np.int64)
    cell = np.repeat((start + skipped - first_step - first_event) * n_slots + slot, count) + event * n_slots
    click = np.empty(n_rows, dtype=np.int64)  # [n_rows] in (step, slot) order, as everything below
    click[cell] = np.repeat(sessions.offsets[first_session:first_session + len(start)] + skipped - first_event,
                            count) + event
    session = np.empty(n_rows, dtype=np.int64)
    session[cell] = np.repeat(np.arange(first_session, first_session + len(start), dtype=np.int64), count)
    carry = np.tile(np.arange(n_slots, dtype=np.int64), n_steps)
    starting = (start >= first_step) & (start < stop_step)
    carry[((start - first_step) * n_slots + slot)[starting]] = -1
    targets = np.take(sessions.items, click + 1, mode="clip")  # clip: the data's last click has no next
    if with_final:
        ending = (end > first_step) & (end <= stop_step)
        targets[((end - 1 - first_step) * n_slots + slot)[ending]] = -1
    return StepBatch(step_offsets=np.arange(n_steps + 1, dtype=np.int64) * n_slots, inputs=sessions.items[click],
                     targets=targets, carry=carry, sessions=session)


def _tail_steps(sessions, first_step, start, end, session, slot, with_final):
    """The steps from first_step on, when sessions have run out: each slot plays its last session
    and is dropped when it ends; the remaining rows keep their (slot) order.

    start, end, session, slot: int64 [n] of the sessions playing at first_step, in slot order.
    Step first_step - 1 is the last in which every slot played (rows = slots)."""
    block_ends = np.unique(end)
    row_before = slot  # each column's row in the step before the block
    click_at_zero = sessions.offsets[session] - start  # a session's click at step t: click_at_zero + t
    step = first_step
    while len(session):
        span = max(1, TAIL_BLOCK_CELLS // len(session))
        stop_step = int(block_ends[min(np.searchsorted(block_ends, step + span), len(block_ends) - 1)])
        t = np.arange(step, stop_step, dtype=np.int64)[:, None]
        playing = t < end  # [n_steps, n_columns], as the other 2-d arrays
        step_offsets = np.zeros(len(t) + 1, dtype=np.int64)
        np.cumsum(playing.sum(axis=1), out=step_offsets[1:])
        row = np.cumsum(playing, axis=1) - 1
        carry = np.where(t == start, -1, np.vstack([row_before[None, :], row[:-1]]))[playing]
        click = (click_at_zero + t)[playing]
        targets = np.take(sessions.items, click + 1, mode="clip")
        if with_final:
            targets[(t == end - 1)[playing]] = -1
        yield StepBatch(step_offsets=step_offsets, inputs=sessions.items[click], targets=targets, carry=carry,
                        sessions=np.broadcast_to(session, playing.shape)[playing])
        kept = end > stop_step
        row_before = row[-1][kept]
        start, end, session, click_at_zero = start[kept], end[kept], session[kept], click_at_zero[kept]
        step = stop_step


def _session_ends(block: StepBatch) -> np.ndarray:
    """int64, ascending: s + 1 for each step s of the block at which some slot's session ends, seen
    as the next step continuing fewer rows than s has. The block's last step is one: blocks end
    there (see session_parallel_steps)."""
    rows = np.diff(block.step_offsets)
    continued = np.add.reduceat(block.carry >= 0, block.step_offsets[:-1], dtype=np.int64)
    return np.append(np.flatnonzero(continued[1:] < rows[:-1]) + 1, block.n_steps)


def chunk_steps(blocks: Iterator[StepBatch], min_steps: int) -> Iterator[StepBatch]:
    """Cut and merge blocks into batches of at least `min_steps` steps (fewer calls per epoch).
    A batch ends at the first step at which some slot's session ends once it holds min_steps
    steps, so batches do not depend on how session_parallel_steps divides the steps into blocks."""
    pending: List[StepBatch] = []
    count = 0
    for block in blocks:
        ends = _session_ends(block)
        step = 0
        while True:
            i = int(np.searchsorted(ends, step + max(min_steps - count, 1)))  # min_steps < 1: every end
            if i == len(ends):
                break
            stop = int(ends[i])
            yield merge(pending + [block.part(step, stop)])
            pending, count, step = [], 0, stop
        if step < block.n_steps:
            pending.append(block.part(step, block.n_steps))
            count += block.n_steps - step
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

    STEPS_PER_BATCH = 256  # session-parallel steps handed to the model per call

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
