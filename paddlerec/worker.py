"""One distributed worker: `python -m paddlerec.worker <log_dir>/job.json`, started by
paddle.distributed.launch for the launcher (paddlerec/launch.py).

How the workers train together
  * Sessions are dealt out rank::world (the reader's `shard`); each worker plays its own
    session-parallel slots, so the union mini-batch of a step has world x batch_size rows.
  * `distribute_strategy: sync` (alias `collective`): gradients are combined every mini-batch
    through Paddle's collectives (gloo on CPU, NCCL on GPU) in `Model.grad_reducer` — the one
    place that decides how the workers' gradients become one update is `SyncReducer` below
    ("combining gradients"): ONE all-gather per mini-batch of every worker's flat buffer
    [row counts | dense gradients | touched row ids | row gradients]; every worker averages the
    dense gradients and concatenates the rows (each already divided by the number of workers).
    Every loss is normalised by its worker's batch_size, so the mean makes the update the one a
    single process would make on the union mini-batch with its loss normalised by the union's
    size. Every worker applies the same combined update and so keeps identical parameters.
    (The model calls the reducer between a step's backward pass and its update; the fused
    kernel does so between its two operators.)
  * `distribute_strategy: geo` with `geo_steps: K` (geo-SGD, `GeoAverager` below): the model's
    grad_reducer stays None, so each worker trains with the model's fastest step (the fused
    kernel) K mini-batches on its own; then one all-gather averages the changes since the last
    exchange of the parameters and optimizer slots: dense tensors over all workers, item rows
    over the workers that touched them. Exchanges happen every K mini-batches and at the end of
    every epoch, so every worker holds the same state after each epoch.
  * Negative samples: every worker draws the same shared negatives (the model's sampler is
    seeded from `seed` alone, as one process's mini-batch shares them), and the workers step in
    lockstep, so the sampler's position is the same everywhere and is never exchanged.
  * All state is checked to be identical on every worker after every epoch (a digest).
  * Collectives need the same number of steps on every worker, but shards give slightly
    different numbers of mini-batches. Every worker trains the SMALLEST count over the workers
    of its mini-batches that hold at least 2 rows (`LockstepReader`); the rest of each shard's
    tail (its last, shrinking mini-batches) is not trained in that epoch. On the 100k RSC15
    split that is about 0.1-0.4 % of the events, always the same ones; the count is logged
    every epoch.
  * Worker 0 (the chief) alone evaluates `eval_phase`, writes checkpoints, inference models and
    curves. The others wait for it on the job's key-value store, not inside a collective:
    gloo gives up a collective after 30 s, which a long evaluation would exceed.
  * Each worker keeps `<log_dir>/status.<local index>.json` (paddlerec/job.py) up to date: the
    launcher reads the outcome there, not in the exit codes.
"""

import dataclasses
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable, Optional

import numpy as np

from . import logs
from .config import Config
from .errors import PeerLost, TrainingError, UserError
from .job import STATUS_FILE, parent_death_signal, read_json, write_json
from .loops import RunContext, select_device

log = logging.getLogger(__name__)

STORE_POLL_SECONDS = 0.05


STOPPED_MESSAGE = "stopped by paddle.distributed.launch (another worker failed, or the job was cancelled)"


class _StoppedByLauncher(BaseException):
    """SIGTERM in a worker: the launcher stops the job (usually because another worker failed)."""


# ---- talking to the other workers ----------------------------------------------------------------

class Collective:
    """The collectives the workers use, with a lost peer turned into one clear error."""

    def __init__(self, world, rank):
        self.world, self.rank = world, rank
        self._store = None

    def _call(self, what, fn):
        try:
            return fn()
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()  # Paddle's C++ errors end with their summary line
            raise PeerLost(f"{what} with the other workers failed, most likely because another worker stopped "
                           f"first ({lines[-1][:200] if lines else type(exc).__name__})") from exc

    def all_reduce_sum(self, tensor):
        import paddle.distributed as dist

        if self.world > 1:
            self._call("an all-reduce", lambda: dist.all_reduce(tensor))
        return tensor

    def all_reduce_int(self, value, op):
        import paddle
        import paddle.distributed as dist

        if self.world == 1:
            return int(value)
        tensor = paddle.to_tensor(np.array([value], np.int64))
        self._call("an all-reduce", lambda: dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op)))
        return int(tensor.item())

    def all_gather(self, tensor):
        """[world] tensors of the same shape. Never zero-size: gloo crashes (SIGFPE) on empty all_gather."""
        import paddle.distributed as dist

        if self.world == 1:
            return [tensor]
        out = []
        self._call("an all-gather", lambda: dist.all_gather(out, tensor))
        return out

    def all_gather_object(self, value):
        import paddle.distributed as dist

        if self.world == 1:
            return [value]
        out = []
        self._call("an all-gather", lambda: dist.all_gather_object(out, value))
        return out

    def barrier(self, name):
        """Wait for every worker on the job's key-value store: unlike a gloo collective (30 s limit)
        this waits as long as the chief needs to evaluate and save."""
        if self.world == 1:
            return
        if self._store is None:
            from paddle.base import core

            self._store = core.create_or_get_global_tcp_store()
        key = f"paddlerec/barrier/{name}"
        self._call("the barrier", lambda: self._store.add(key, 1))
        while self._call("the barrier", lambda: self._store.add(key, 0)) < self.world:
            time.sleep(STORE_POLL_SECONDS)


# ---- one exchange per step: variable-length buffers in one all-gather -----------------------------

def _bits(values, dtype):
    """int64 values as the bits of `dtype` elements (8 bytes each), to ride in a float buffer."""
    import paddle

    return paddle.view(paddle.to_tensor(np.ascontiguousarray(values, np.int64)), dtype)


def _ints(tensor):
    """The int64 values whose bits `tensor` (a float slice made by _bits) carries. On the host:
    paddle.view of a slice that does not start at 0 reads the wrong elements (Paddle 3.3)."""
    return np.ascontiguousarray(tensor.numpy()).view(np.int64)


def _tensor_of(array):
    """A CPU tensor of a numpy array, sharing its memory where DLPack can (else a copy)."""
    import paddle

    try:
        from paddle.utils.dlpack import from_dlpack

        return from_dlpack(array)
    except (AttributeError, TypeError, RuntimeError, ValueError, BufferError):
        return paddle.to_tensor(array)


class FlatGather:
    """All-gather of one 1-D float buffer per worker, whose lengths differ, in ONE collective.

    Each worker sends  [its length, as int64 bits | its buffer | zeros]  of one agreed length
    (`capacity`). A worker whose buffer does not fit sends its length alone; every worker then
    sees the longest length, grows the capacity by the same rule, and the gather is repeated.
    That happens at the first exchange of a job and rarely after it: a worker's exchanges keep
    about one size (a session-parallel mini-batch only shrinks at the end of an epoch).
    Returns the workers' buffers, in rank order, as views of the gathered tensors.
    """

    GROWTH = 1.125  # slack over the longest buffer seen, so slightly longer ones do not gather twice

    def __init__(self, comm):
        self.comm = comm
        self.capacity = 0  # payload elements after the header; the same on every worker
        self.collectives = 0

    def __call__(self, body):
        import paddle

        dtype = body.dtype
        length = int(body.shape[0])
        header = _bits([length], dtype)
        width = int(header.shape[0])
        while True:
            fits = length <= self.capacity
            parts = [header] + ([body] if fits and length else [])
            missing = self.capacity - (length if fits else 0)
            if missing:
                parts.append(paddle.zeros([missing], dtype))
            gathered = self.comm.all_gather(paddle.concat(parts) if len(parts) > 1 else header)
            self.collectives += 1
            lengths = [int(_ints(g[:width])[0]) for g in gathered]
            longest = max(lengths)
            if longest <= self.capacity:
                return [g[width:width + n] for g, n in zip(gathered, lengths)]
            self.capacity = int(longest * self.GROWTH) + 1

    def host(self, parts):
        """The same for a buffer made of numpy float32 arrays (concatenated): one copy into the
        padded buffer, which the collective reads in place; returns numpy arrays (views of the
        gathered tensors where DLPack allows)."""
        length = sum(int(p.size) for p in parts)
        width = 2  # float32 elements of the int64 length
        while True:
            fits = length <= self.capacity
            buffer = np.empty(width + self.capacity, np.float32)
            buffer[:width] = np.array([length], np.int64).view(np.float32)
            at = width
            if fits:
                for p in parts:
                    buffer[at:at + p.size] = p.reshape(-1)
                    at += p.size
            buffer[at:] = 0
            gathered = [_host_array(g)[0] for g in self.comm.all_gather(_tensor_of(buffer))]
            self.collectives += 1
            lengths = [int(g[:width].view(np.int64)[0]) for g in gathered]
            longest = max(lengths)
            if longest <= self.capacity:
                return [g[width:width + n] for g, n in zip(gathered, lengths)]
            self.capacity = int(longest * self.GROWTH) + 1


# ---- combining gradients: how the workers' gradients become one update ------------------------

SYNC_STRATEGIES = ("sync", "collective")  # collective: the name sync had before geo existed


def gradient_combiner(runner, comm):
    """The `Model.grad_reducer` of this job (the runner's settings decide it). One worker has
    nothing to combine, and geo workers step alone between their exchanges (GeoAverager), so
    both train with None: the model keeps its fastest step (the fused kernel). A new way of
    combining gradients is a class beside SyncReducer, chosen here."""
    if comm.world == 1 or runner["distribute_strategy"] not in SYNC_STRATEGIES:
        return None
    return SyncReducer(comm)


class SyncReducer:
    """`Model.grad_reducer` of `distribute_strategy: sync`: the mean over the workers of the dense
    and the row-sparse gradients, in one all-gather per mini-batch (FlatGather).

    Each worker's buffer, on Paddle tensors (so NCCL can keep it on the GPU):
        [row counts (one per row-sparse parameter, int64 bits) | every dense gradient, flattened |
         row ids (int64 bits) | row gradients * 1/world]
    (a worker's rows are its inputs, targets and negatives, repeats kept; its batch shrinks at the
    end of its shard). Every worker unpacks the same buffers in rank order: the dense gradients
    are summed in that order and divided by the number of workers, the rows are concatenated.
    So all apply the same update. Every loss is normalised by its worker's batch_size, so the
    mean is the update a single process would make on the union mini-batch with its loss
    normalised by the union's size.
    """

    def __init__(self, comm):
        self.comm = comm
        self.gather = FlatGather(comm)
        self.seconds = 0.0  # spent combining gradients (waiting for the slowest worker included)

    def __call__(self, dense, sparse):
        started = time.perf_counter()
        try:
            return self._combine(dense, sparse)
        finally:
            self.seconds += time.perf_counter() - started

    def _combine(self, dense, sparse):
        tensors = list(dense.values()) + [g for _, g in sparse.values()]
        if all(t.place.is_cpu_place() and str(t.dtype).endswith("float32") for t in tensors):
            return self._combine_on_host(dense, sparse)
        return self._combine_tensors(dense, sparse)

    def _combine_on_host(self, dense, sparse):
        """_combine_tensors in numpy (gloo's tensors live on the host anyway): the same buffers and
        arithmetic, with a tenth of the per-operator overhead."""
        import paddle

        world, rank = self.comm.world, self.comm.rank
        dense_names, sparse_names = sorted(dense), sorted(sparse)  # the same order on every worker
        shapes = [list(dense[n].shape) for n in dense_names]
        sizes = [int(np.prod(s)) for s in shapes]
        tails = [list(sparse[n][1].shape[1:]) for n in sparse_names]
        widths = [int(np.prod(t)) for t in tails]
        rows = [np.asarray(sparse[n][0], np.int64) for n in sparse_names]
        counts = np.array([len(r) for r in rows], np.int64)
        scale = np.float32(1.0 / world)

        parts = [counts.view(np.float32)] + [_host_array(dense[n])[0].reshape(-1) for n in dense_names]
        mine = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        if len(mine):
            parts.append(mine.view(np.float32))
            parts += [_host_array(sparse[n][1])[0].reshape(-1) * scale for n, c in zip(sparse_names, counts) if c]
        gathered = self.gather.host(parts)

        head, n_dense = 2 * len(sparse_names), sum(sizes)
        total = gathered[0][head:head + n_dense].copy()
        for body in gathered[1:]:  # summed in rank order: the same sum on every worker
            total += body[head:head + n_dense]
        total *= scale
        combined_dense = {}
        if dense_names:
            flat = paddle.to_tensor(total)
            pieces = paddle.split(flat, sizes) if len(sizes) > 1 else [flat]
            combined_dense = {n: part.reshape(shape) for n, part, shape in zip(dense_names, pieces, shapes)}
        if not sparse_names:
            return combined_dense, {}

        all_counts = [body[:head].view(np.int64) for body in gathered]
        if len(mine):
            at = head + n_dense
            if not np.array_equal(gathered[rank][at:at + 2 * len(mine)].view(np.int64), mine):
                raise TrainingError("the gradient exchange altered the row ids it carried; this is a bug in "
                                    "paddlerec/worker.py or in the collective backend")
        ids = [[] for _ in sparse_names]
        values = [[] for _ in sparse_names]
        for r, body in enumerate(gathered):
            m = int(all_counts[r].sum())
            id_at = head + n_dense
            value_at = id_at + 2 * m
            for j in range(len(sparse_names)):
                c = int(all_counts[r][j])
                if c:
                    ids[j].append(body[id_at:id_at + 2 * c].view(np.int64))
                    values[j].append(body[value_at:value_at + c * widths[j]])
                id_at += 2 * c
                value_at += c * widths[j]
        out = {}
        for j, n in enumerate(sparse_names):
            merged_ids = np.concatenate(ids[j]) if ids[j] else np.zeros(0, np.int64)
            merged = np.concatenate(values[j]) if values[j] else np.zeros(0, np.float32)
            out[n] = (merged_ids, paddle.to_tensor(merged.reshape([len(merged_ids)] + tails[j])))
        return combined_dense, out

    def _combine_tensors(self, dense, sparse):
        import paddle

        world, rank = self.comm.world, self.comm.rank
        dense_names, sparse_names = sorted(dense), sorted(sparse)  # the same order on every worker
        dtype = (dense[dense_names[0]] if dense_names else sparse[sparse_names[0]][1]).dtype
        shapes = [list(dense[n].shape) for n in dense_names]
        sizes = [int(np.prod(s)) for s in shapes]
        tails = [list(sparse[n][1].shape[1:]) for n in sparse_names]
        widths = [int(np.prod(t)) for t in tails]
        rows = [np.asarray(sparse[n][0], np.int64) for n in sparse_names]
        counts = [len(r) for r in rows]

        parts = [_bits(counts, dtype)] if sparse_names else []
        parts += [dense[n].reshape([-1]) for n in dense_names]
        if sum(counts):
            parts.append(_bits(np.concatenate(rows), dtype))
            parts.append(paddle.concat([sparse[n][1].reshape([-1]) for n, c in zip(sparse_names, counts) if c])
                         * (1.0 / world))
        gathered = self.gather(paddle.concat(parts) if len(parts) > 1 else parts[0])

        per_id = 8 // gathered[0].element_size()  # gradient-dtype elements that hold one int64
        head = len(sparse_names) * per_id
        n_dense = sum(sizes)
        total = gathered[0][head:head + n_dense]
        for body in gathered[1:]:  # summed in rank order: the same sum on every worker
            total = total + body[head:head + n_dense]
        combined_dense = {}
        if dense_names:
            for n, part, shape in zip(dense_names, paddle.split(total * (1.0 / world), sizes), shapes):
                combined_dense[n] = part.reshape(shape)
        if not sparse_names:
            return combined_dense, {}

        all_counts = np.stack([_ints(body[:head]) for body in gathered])  # [world, k]
        mine = int(all_counts[rank].sum())
        if mine:
            # the ids travel as bits through collectives that only copy; check that ours came back intact
            at = head + n_dense
            if not np.array_equal(_ints(gathered[rank][at:at + mine * per_id]), np.concatenate(rows)):
                raise TrainingError("the gradient exchange altered the row ids it carried; this is a bug in "
                                    "paddlerec/worker.py or in the collective backend")
        bodies = [body[head + n_dense:] for body in gathered]
        return combined_dense, unpack_rows(sparse_names, tails, widths, per_id, all_counts, bodies, dtype)


def unpack_rows(names, tails, widths, per_id, all_counts, bodies, dtype):
    """{name: (row ids int64 [sum over workers m], row gradients [sum m, *tail])} from the
    workers' row sections (worker r's: its row ids for every name, as bits, then its gradients
    for every name)."""
    import paddle

    rows = {n: [] for n in names}
    values = {n: [] for n in names}
    for r, body in enumerate(bodies):
        m = int(all_counts[r].sum())
        if m == 0:
            continue
        ids = _ints(body[:m * per_id])
        row_at, value_at = 0, m * per_id
        for j, n in enumerate(names):
            c = int(all_counts[r, j])
            if c:
                rows[n].append(ids[row_at:row_at + c])
                values[n].append(body[value_at:value_at + c * widths[j]])
            row_at += c
            value_at += c * widths[j]
    out = {}
    for j, n in enumerate(names):
        total = int(all_counts[:, j].sum())
        if not values[n]:
            out[n] = (np.zeros(0, np.int64), paddle.zeros([0] + tails[j], dtype))
            continue
        merged = paddle.concat(values[n]) if len(values[n]) > 1 else values[n][0]
        out[n] = (np.concatenate(rows[n]), merged.reshape([total] + tails[j]))
    return out


# ---- geo: each worker trains alone for geo_steps mini-batches, then the changes are averaged ------

def _host_array(tensor):
    """(array, shares): a numpy array of the tensor's values; shares says whether it IS the
    tensor's memory (a CPU tensor, through DLPack: writing it writes the tensor) or a copy."""
    if tensor.place.is_cpu_place():
        try:
            return np.from_dlpack(tensor if tensor.stop_gradient else tensor.detach()), True
        except (BufferError, TypeError, RuntimeError, ValueError):
            pass
    return tensor.numpy(), False


def _rows(array, ids):
    """array[ids] for unique ascending ids: a view when they are every row."""
    return array if len(ids) == len(array) else np.take(array, ids, axis=0)


class GeoAverager:
    """`distribute_strategy: geo` (geo-SGD): the workers train geo_steps mini-batches each on their
    own (with the model's own step: the fused kernel), then one exchange averages what changed.

    What is exchanged: every float32 tensor of the network's state and of the optimizer state
    (parameters, and the Adagrad/momentum/Adam slots), as its change since the last exchange.
      * item-indexed tensors (first dimension = the number of items): a worker sends the rows it
        touched, i.e. whose values changed in the parameter or in any of its slots (tensors
        named `<parameter>` and `<parameter>.<slot>` are one table). A row becomes
        base + (sum of the changes) / (workers that touched it); untouched rows stay as they are;
      * every other tensor: base + (sum of the changes) / world.
    Integer state is not exchanged: the items' click counts come from the same data on every
    worker, and the negative sampler's position moves alike everywhere (every worker draws the
    SAME negatives, from the model's seed, as one process's mini-batch shares them; workers step
    in lockstep, so every worker draws the same number of rows). The per-epoch digest checks both.
    After an exchange every worker holds the same state, bit for bit: it is computed from the
    same gathered buffers, summed in rank order. Exchanges happen every geo_steps mini-batches
    (batches are cut there with `part`) and at the end of every epoch.

    Cost: one comparison of every item table with its copy from the last exchange (to find the
    touched rows; on the CPU the tensors are read and written in place through DLPack), then
    work and traffic in proportion to the touched rows.
    """

    def __init__(self, comm, n_items, every):
        self.comm, self.n_items, self.every = comm, n_items, every
        self.gather = FlatGather(comm)
        self.model = None  # set by the worker when run_train builds it
        self.base = None  # {key: float32 ndarray}: the state after the last exchange
        self.seconds = 0.0  # spent exchanging (waiting for the slowest worker included)
        self.exchanges = 0

    def attach(self, model):
        self.model = model

    def _live(self):
        """{key: tensor} of the exchanged state; key = (source, name)."""
        model = self.model
        out = {}
        for source, state in (("network", model.network.state_dict()), ("optimizer", model.optimizer_state())):
            for name, value in state.items():
                if str(value.dtype).endswith("float32"):
                    out[(source, name)] = value
        return out

    def snapshot(self):
        """The state the next exchange measures changes from (the same on every worker)."""
        self.base = {key: np.array(value.numpy(), np.float32) for key, value in self._live().items()}

    def _item_indexed(self, array):
        return array.ndim >= 1 and array.shape[0] == self.n_items

    def epoch(self, batches):
        """The epoch's batches, cut at every geo_steps-th mini-batch; after each such mini-batch
        has been trained (when the train loop asks for the next batch) the workers exchange."""
        self.snapshot()
        since = 0  # mini-batches trained since the last exchange
        for batch in batches:
            first = 0
            while first < batch.n_steps:
                stop = min(batch.n_steps, first + self.every - since)
                yield batch if first == 0 and stop == batch.n_steps else batch.part(first, stop)
                since += stop - first
                first = stop
                if since == self.every:
                    self.exchange()
                    since = 0
        if since:
            self.exchange()

    def exchange(self):
        started = time.perf_counter()
        try:
            self._exchange()
        finally:
            self.seconds += time.perf_counter() - started
            self.exchanges += 1

    def _exchange(self):
        import paddle

        live = self._live()
        keys = sorted(live)  # the same order on every worker
        arrays = {k: _host_array(live[k]) for k in keys}  # key -> (values, shares the tensor's memory)
        base = self.base
        dense_keys = [k for k in keys if not self._item_indexed(base[k])]
        tables = {}  # parameter name -> its item-indexed keys (the parameter and its slots)
        for k in keys:
            if self._item_indexed(base[k]):
                tables.setdefault(k[1].split(".")[0], []).append(k)
        table_names = sorted(tables)
        touched = []  # per table: the rows this worker changed, ascending
        for t in table_names:
            changed = np.zeros(self.n_items, bool)
            for k in tables[t]:  # compared as bits (faster than floats, and -0.0 counts as a change)
                differs = np.not_equal(arrays[k][0].view(np.int32), base[k].view(np.int32))
                changed |= differs.reshape(self.n_items, -1).view(np.uint8).max(axis=1).astype(bool)
            touched.append(np.flatnonzero(changed))

        # [touched-row counts per table, int64 bits | dense changes | row ids, int64 bits | rows' changes]
        parts = [np.array([len(ids) for ids in touched], np.int64).view(np.float32)]
        parts += [(arrays[k][0] - base[k]).reshape(-1) for k in dense_keys]
        parts += [ids.astype(np.int64).view(np.float32) for ids in touched]
        for t, ids in zip(table_names, touched):
            parts += [(_rows(arrays[k][0], ids) - _rows(base[k], ids)).reshape(-1) for k in tables[t]]
        gathered = self.gather.host(parts)

        world = self.comm.world
        head = 2 * len(table_names)
        counts = [body[:head].view(np.int64) for body in gathered]
        new = {}  # key -> (rows or None for all, new values)
        at = head
        for k in dense_keys:
            size = base[k].size
            total = gathered[0][at:at + size].copy()
            for body in gathered[1:]:  # rank order: the same sum on every worker
                total += body[at:at + size]
            new[k] = (None, base[k] + (total / np.float32(world)).reshape(base[k].shape))
            at += size
        # each worker's row ids and the offset of its rows' changes, per table
        ids_of, values_at = [], []
        for r, body in enumerate(gathered):
            id_at, ids_r = at, []
            for j in range(len(table_names)):
                c = int(counts[r][j])
                ids_r.append(np.ascontiguousarray(body[id_at:id_at + 2 * c]).view(np.int64))
                id_at += 2 * c
            ids_of.append(ids_r)
            values_at.append(id_at)
        for j, t in enumerate(table_names):
            rows = np.unique(np.concatenate([ids_of[r][j] for r in range(world)]))  # touched by any worker
            n_touching = np.zeros(len(rows), np.float32)
            sums = {k: np.zeros((len(rows),) + base[k].shape[1:], np.float32) for k in tables[t]}
            for r, body in enumerate(gathered):
                at_rows = np.searchsorted(rows, ids_of[r][j])  # a worker's ids are unique: plain += is right
                n_touching[at_rows] += 1
                for k in tables[t]:
                    width = int(np.prod(base[k].shape[1:], dtype=np.int64))
                    c = len(at_rows)
                    sums[k][at_rows] += body[values_at[r]:values_at[r] + c * width].reshape(
                        (c,) + base[k].shape[1:])
                    values_at[r] += c * width
            shape = (-1,) + (1,) * (base[tables[t][0]].ndim - 1)
            for k in tables[t]:
                new[k] = (rows, _rows(base[k], rows) + sums[k] / n_touching.reshape(shape))

        optimizer_values = {}
        for k, (rows, values) in new.items():
            array, shares = arrays[k]
            every_row = rows is None or len(rows) == len(base[k])  # rows are unique and ascending
            if every_row:
                base[k] = values.reshape(base[k].shape)
            else:
                base[k][rows] = values
            if shares:  # written in place: the tensor's memory
                if every_row:
                    array[...] = values.reshape(array.shape)
                else:
                    array[rows] = values
            elif k[0] == "network":
                live[k].set_value(base[k])  # a Layer's state_dict holds its live tensors
            else:
                optimizer_values[k[1]] = base[k]
        if optimizer_values:
            self.model.load_optimizer_state(optimizer_values)


# ---- the epochs: lockstep, and the same parameters everywhere -------------------------------------

class LockstepReader:
    """A worker's training reader whose epochs hold the same number of mini-batches on every worker.

    The count is the smallest over the workers of their mini-batches with at least 2 rows. (A
    session-parallel batch only shrinks, so those are a prefix. The reference step skips a
    1-row mini-batch when it has no shared negatives — without calling the reducer, which would
    leave the workers out of step.)
    """

    def __init__(self, reader, comm, geo=None):
        self._reader = reader
        self._comm = comm
        self._geo = geo  # GeoAverager: cuts the epoch at its exchange points and exchanges there
        self.last_epoch = {"steps": 0, "events": 0, "dropped_steps": 0, "dropped_events": 0}

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def batches(self, batch_size, training, known_items=None, shard=(0, 1), **options):
        if not training or self._comm.world == 1:
            return self._reader.batches(batch_size, training, known_items=known_items, shard=shard, **options)
        usable = steps = events = 0
        step_events = []
        for batch in self._reader.batches(batch_size, True, known_items=known_items, shard=shard):
            per_step = np.asarray(batch.step_events, np.int64)  # training: one event per row
            step_events.append(per_step)
            usable += int((per_step >= 2).sum())
            steps += batch.n_steps
            events += int(per_step.sum())
        agreed = self._comm.all_reduce_int(usable, "MIN")
        per_step = np.concatenate(step_events) if step_events else np.zeros(0, np.int64)
        trained = int(per_step[:agreed].sum())
        self.last_epoch = {"steps": agreed, "events": trained, "dropped_steps": steps - agreed,
                           "dropped_events": events - trained}
        cut = self._cut(batch_size, known_items, shard, agreed)
        return cut if self._geo is None else self._geo.epoch(cut)

    def _cut(self, batch_size, known_items, shard, n_steps):
        left = n_steps
        for batch in self._reader.batches(batch_size, True, known_items=known_items, shard=shard):
            if left <= 0:
                return
            if batch.n_steps <= left:
                left -= batch.n_steps
                yield batch
            else:
                yield batch.head(left)
                left = 0


def state_digest(*states):
    """A short hash of named tensors (network state_dict, optimizer state): equal digests mean
    bit-identical state."""
    h = hashlib.sha256()
    for state in states:
        for name in sorted(state):
            value = state[name]
            array = np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else np.asarray(value))
            h.update(f"{name}|{array.dtype}|{array.shape}|".encode())
            h.update(array.tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(reader):
    info = reader.info()
    h = hashlib.sha256()
    h.update(f"{info.n_items}|{reader.n_queries}|".encode())
    if info.item_support is not None:
        h.update(np.ascontiguousarray(info.item_support, np.int64).tobytes())
    if info.labels is not None:
        h.update("\n".join(info.labels).encode())
    return h.hexdigest()[:16]


class _Status:
    """This worker's `status.<local index>.json`, rewritten atomically at every change."""

    def __init__(self, log_dir, local_rank, token):
        self.path = os.path.join(log_dir, STATUS_FILE.format(local_rank))
        self.value = {"token": token, "local_rank": local_rank, "rank": None, "world": None, "pid": os.getpid(),
                      "host": socket.gethostname(), "state": "starting", "epochs": [], "digest": None,
                      "error": None, "failed_at": None}
        self.write()

    def update(self, **values):
        self.value.update(values)
        self.write()

    def write(self):
        write_json(self.path, self.value)


class _EpochSync:
    """`on_epoch` of run_train: meet after the chief's evaluation and saving, compare the
    parameters, and record the epoch's figures over all workers."""

    def __init__(self, comm, reader, status, exchanger):
        self.comm, self.reader, self.status = comm, reader, status
        self.exchanger = exchanger  # SyncReducer, GeoAverager or None: its `seconds` are the exchange time

    def __call__(self, epoch, model, result):
        self.comm.barrier(f"epoch/{epoch}")
        digest = state_digest(model.network.state_dict(), model.optimizer_state())
        cut = self.reader.last_epoch
        exchange = self.exchanger.seconds if self.exchanger is not None else 0.0
        if self.exchanger is not None:
            self.exchanger.seconds = 0.0
        rows = self.comm.all_gather_object({"events": result.events, "seconds": result.seconds, "digest": digest,
                                            "dropped_events": cut["dropped_events"], "exchange_seconds": exchange})
        digests = [r["digest"] for r in rows]
        if len(set(digests)) > 1:
            raise TrainingError(f"after epoch {epoch} the workers' parameters differ (digests by rank: "
                                f"{', '.join(digests)}); if they continued from init_model_path on several machines, "
                                f"give every machine the same checkpoint, otherwise this is a bug")
        events = sum(r["events"] for r in rows)
        seconds = max(r["seconds"] for r in rows)
        figures = {"epoch": epoch, "world": self.comm.world, "events": events, "seconds": seconds,
                   "events_per_s": events / seconds if seconds > 0 else 0.0,
                   "dropped_events": sum(r["dropped_events"] for r in rows), "loss": result.loss,
                   "exchange_seconds": max(r["exchange_seconds"] for r in rows)}
        if self.comm.rank == 0:
            log.info("epoch %d over %d workers: %d events in %.2fs, %.0f events/s (%.2fs exchanging); %d "
                     "events of the shards' tails not trained (lockstep)", epoch, self.comm.world, events, seconds,
                     figures["events_per_s"], figures["exchange_seconds"], figures["dropped_events"])
        self.status.update(epochs=self.status.value["epochs"] + [figures], digest=digest)


@dataclasses.dataclass
class _WorkerContext(RunContext):
    """The RunContext of a worker: tells `on_model` about the model run_train builds (geo keeps
    it to read and write its state at the exchanges)."""

    on_model: Optional[Callable] = None

    def model_module(self, phase_name):
        module = super().model_module(phase_name)
        return module if self.on_model is None else _ModelHook(module, self.on_model)


class _ModelHook:
    """A model file's module whose `Model(...)` also hands the new model to a callback."""

    def __init__(self, module, on_model):
        self._module, self._on_model = module, on_model

    def __getattr__(self, name):
        return getattr(self._module, name)

    def Model(self, *args, **kwargs):  # noqa: N802 (the contract's name)
        model = self._module.Model(*args, **kwargs)
        self._on_model(model)
        return model


def _train(job, status):
    """The worker's whole job: join the others, train its shard in lockstep, report."""
    import paddle.distributed as dist

    from .runners import run_train  # imports paddle: only once worker_main has set its threads

    config = Config(**job["config"])
    runner_name = job["runner"]
    runner = config.runners[runner_name]
    # set by paddle.distributed.launch for each worker it starts
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    select_device(runner_name, runner["device"])
    if world > 1:
        dist.init_parallel_env()
    comm = Collective(world, rank)
    status.update(state="running", rank=rank, world=world)
    log.info("worker %d of %d on %s (pid %d, %s thread(s))", rank, world, socket.gethostname(), os.getpid(),
             os.environ.get("OMP_NUM_THREADS"))

    ctx = _WorkerContext(config, show_progress=False)
    phase = runner["phases"][0]
    reader = ctx.reader(phase)
    comm.barrier("data")  # reading may take long on one machine: meet on the store before any collective
    fingerprints = comm.all_gather_object(data_fingerprint(reader))
    if len(set(fingerprints)) > 1:
        differing = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
        raise UserError(f"the training data of worker(s) {differing} differs from worker 0's "
                        f"({config.dataset_of(phase)['data_path']}); every machine needs the same files")
    reducer = gradient_combiner(runner, comm)
    geo = None
    if runner["distribute_strategy"] == "geo" and world > 1:
        geo = GeoAverager(comm, reader.info().n_items, runner["geo_steps"])
        ctx.on_model = geo.attach
    lockstep = LockstepReader(reader, comm, geo)
    ctx.readers[config.phases[phase]["dataset_name"]] = lockstep
    log.info("distribute_strategy %s%s", runner["distribute_strategy"],
             f", geo_steps {runner['geo_steps']}" if runner["distribute_strategy"] == "geo" else "")
    # _EpochSync records each epoch's figures and parameter digest in the status file
    run_train(ctx, runner_name, shard=(rank, world), grad_reducer=reducer, is_chief=rank == 0,
              on_epoch=_EpochSync(comm, lockstep, status, reducer or geo))


def worker_main(argv=None):
    """Entry point of one worker: `python -m paddlerec.worker <log_dir>/job.json` (the runner
    has paddle.distributed.launch start it)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m paddlerec.worker JOB_JSON (started by the distributed runners)", file=sys.stderr)
        return 2
    # die with the launcher even if it is killed outright (no cleanup would reach us then)
    parent_death_signal(signal.SIGKILL)()
    job = read_json(args[0])
    if job is None:
        print(f"error: no job file {args[0]}", file=sys.stderr)
        return 2
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])  # Paddle reads it once, when imported below
    logs.configure()
    status = _Status(job["log_dir"], int(os.environ.get("PADDLE_LOCAL_RANK", "0")), job["token"])

    handling = []  # set once an error is being recorded: the first one recorded is kept

    def failed(message, exit_code, kind):
        if handling:
            return
        handling.append(kind)
        status.update(state="failed", failed_at=time.time(),
                      error={"message": message, "exit_code": exit_code, "kind": kind})

    def stopped(signum, frame):
        # recorded here, not where the exception lands: Python may raise it inside a finaliser,
        # which swallows it, or inside the handling of another error
        if not handling:
            failed(STOPPED_MESSAGE, 143, "stopped")
            raise _StoppedByLauncher()

    try:
        try:
            import paddle  # noqa: F401  (imported before the handler: Paddle installs its own on import)

            signal.signal(signal.SIGTERM, stopped)
            _train(job, status)
        except _StoppedByLauncher:
            return 143  # recorded by the handler
        except PeerLost as exc:
            failed(f"{exc.prefix}: {exc}", exc.exit_code, "peer")
            print(f"{exc.prefix}: {exc}", file=sys.stderr)
            return exc.exit_code
        except UserError as exc:
            failed(f"{exc.prefix}: {exc}", exc.exit_code, "own")
            print(f"{exc.prefix}: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            failed("interrupted", 130, "own")
            return 130
        except BaseException as exc:  # a bug: recorded for the runner, traceback kept in the worker log
            failed(f"{type(exc).__name__}: {exc}", 1, "own")
            raise
    except _StoppedByLauncher:  # SIGTERM arrived while another error was being handled, before it was recorded
        return 143
    status.update(state="done")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
