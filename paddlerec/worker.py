"""One distributed worker: `python -m paddlerec.worker <log_dir>/job.json`, started by
paddle.distributed.launch for the launcher (paddlerec/launch.py).

How the workers train together
  * Sessions are dealt out rank::world (the reader's `shard`); each worker plays its own
    session-parallel slots, so the union mini-batch of a step has world x batch_size rows.
  * Gradients are combined every mini-batch through Paddle's collectives (gloo on CPU, NCCL on
    GPU) in `Model.grad_reducer` — the one place that decides how the workers' gradients become
    one update is `CollectiveReducer` below ("combining gradients"): dense gradients are
    all-reduced and divided by the number of workers; the touched item rows and their gradients
    are all-gathered (padded to the longest) and divided likewise. Every loss is normalised by
    its worker's batch_size, so the mean makes the update the one a single process would make
    on the union mini-batch with its loss normalised by the union's size. Every worker applies
    the same combined update and so keeps identical parameters; this is checked after every
    epoch (a digest of all state).
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

import hashlib
import logging
import os
import signal
import socket
import sys
import time

import numpy as np

from . import logs
from .config import Config
from .errors import PeerLost, TrainingError, UserError
from .job import STATUS_FILE, parent_death_signal, read_json, write_json
from .loops import RunContext, select_device

log = logging.getLogger(__name__)

STORE_POLL_SECONDS = 0.05


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


def _padded(tensor, length):
    import paddle

    missing = length - tensor.shape[0]
    return paddle.concat([tensor, paddle.zeros([missing], tensor.dtype)]) if missing > 0 else tensor


# ---- combining gradients: how the workers' gradients become one update ------------------------

def gradient_combiner(runner, comm):
    """The `Model.grad_reducer` of this job (the runner's settings decide it; one worker has
    nothing to combine). A new way of combining is a class beside CollectiveReducer, chosen here."""
    if comm.world == 1:
        return None
    return CollectiveReducer(comm)


class CollectiveReducer:
    """`Model.grad_reducer`: the mean over the workers of the dense and the row-sparse gradients.

    Two collectives per mini-batch, on Paddle tensors (so NCCL can keep them on the GPU):
      1. all-reduce (sum) of  [every dense gradient, flattened | counts]  where counts is a
         [world, k] block of zeros in which each worker writes its k row counts (one per
         row-sparse parameter) in its own row: the sum hands every worker all the counts;
      2. all-gather of  [row ids | row gradients * 1/world]  padded to the longest worker's
         (a worker's rows are its inputs, targets and negatives; its batch shrinks at the end of
         its shard). The int64 row ids travel as their bits, viewed as the gradient dtype.
    Every worker unpacks the same buffers in rank order, so all apply the same update.
    """

    def __init__(self, comm):
        self.comm = comm
        self.seconds = 0.0  # spent combining gradients (waiting for the slowest worker included)

    def __call__(self, dense, sparse):
        started = time.perf_counter()
        try:
            return self._combine(dense, sparse)
        finally:
            self.seconds += time.perf_counter() - started

    def _combine(self, dense, sparse):
        import paddle

        world, rank = self.comm.world, self.comm.rank
        scale = 1.0 / world
        dense_names, sparse_names = sorted(dense), sorted(sparse)  # the same order on every worker
        dtype = (dense[dense_names[0]] if dense_names else sparse[sparse_names[0]][1]).dtype
        shapes = [list(dense[n].shape) for n in dense_names]
        sizes = [int(np.prod(s)) for s in shapes]
        counts = np.zeros((world, len(sparse_names)), np.float32)  # exact: counts stay far below 2**24
        counts[rank] = [len(sparse[n][0]) for n in sparse_names]
        header = self.comm.all_reduce_sum(paddle.concat(
            [dense[n].reshape([-1]) for n in dense_names] + [paddle.to_tensor(counts.reshape(-1), dtype=dtype)]))

        combined_dense = {}
        n_dense = sum(sizes)
        if dense_names:
            for n, part, shape in zip(dense_names, paddle.split(header[:n_dense] * scale, sizes), shapes):
                combined_dense[n] = part.reshape(shape)
        if not sparse_names:
            return combined_dense, {}
        all_counts = np.rint(header[n_dense:].numpy()).astype(np.int64).reshape(world, len(sparse_names))
        tails = [list(sparse[n][1].shape[1:]) for n in sparse_names]
        widths = np.array([int(np.prod(t)) for t in tails], np.int64)
        per_row = 8 // header.element_size()  # gradient-dtype elements that hold one int64 row id
        lengths = all_counts.sum(axis=1) * per_row + (all_counts * widths).sum(axis=1)

        parts = []
        rows = np.concatenate([np.asarray(sparse[n][0], np.int64) for n in sparse_names])
        if len(rows):
            parts = [paddle.view(paddle.to_tensor(rows), dtype),
                     paddle.concat([sparse[n][1].reshape([-1]) for n in sparse_names]) * scale]
        body = paddle.concat(parts) if parts else paddle.zeros([0], dtype)
        gathered = self.comm.all_gather(_padded(body, max(1, int(lengths.max()))))  # never zero-size (SIGFPE)
        if len(rows):
            # the ids travel as bits through float ops that only copy; check that ours came back intact
            back = paddle.view(gathered[rank][:len(rows) * per_row], "int64").numpy()
            if not np.array_equal(back, rows):
                raise TrainingError("the gradient exchange altered the row ids it carried; this is a bug in "
                                    "paddlerec/worker.py or in the collective backend")
        return combined_dense, unpack_rows(sparse_names, tails, widths, per_row, all_counts, gathered)


def unpack_rows(names, tails, widths, per_row, all_counts, gathered):
    """{name: (row ids int64 [sum over workers m], row gradients [sum m, *tail])} from the gathered
    bodies (worker r's: its row ids for every name, as bits, then its gradients for every name)."""
    import paddle

    rows = {n: [] for n in names}
    values = {n: [] for n in names}
    for r, body in enumerate(gathered):
        m = int(all_counts[r].sum())
        if m == 0:
            continue
        ids = paddle.view(body[:m * per_row], "int64").numpy()
        row_at, value_at = 0, m * per_row
        for j, n in enumerate(names):
            c = int(all_counts[r, j])
            if c:
                rows[n].append(ids[row_at:row_at + c])
                values[n].append(body[value_at:value_at + c * int(widths[j])])
            row_at += c
            value_at += c * int(widths[j])
    out = {}
    for j, n in enumerate(names):
        total = int(all_counts[:, j].sum())
        if not values[n]:
            out[n] = (np.zeros(0, np.int64), paddle.zeros([0] + tails[j], gathered[0].dtype))
            continue
        merged = paddle.concat(values[n]) if len(values[n]) > 1 else values[n][0]
        out[n] = (np.concatenate(rows[n]), merged.reshape([total] + tails[j]))
    return out


# ---- the epochs: lockstep, and the same parameters everywhere -------------------------------------

class LockstepReader:
    """A worker's training reader whose epochs hold the same number of mini-batches on every worker.

    The count is the smallest over the workers of their mini-batches with at least 2 rows. (A
    session-parallel batch only shrinks, so those are a prefix. The reference step skips a
    1-row mini-batch when it has no shared negatives — without calling the reducer, which would
    leave the workers out of step.)
    """

    def __init__(self, reader, comm):
        self._reader = reader
        self._comm = comm
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
        return self._cut(batch_size, known_items, shard, agreed)

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

    def __init__(self, comm, reader, status, reducer):
        self.comm, self.reader, self.status, self.reducer = comm, reader, status, reducer

    def __call__(self, epoch, model, result):
        self.comm.barrier(f"epoch/{epoch}")
        digest = state_digest(model.network.state_dict(), model.optimizer_state())
        cut = self.reader.last_epoch
        exchange = self.reducer.seconds if self.reducer is not None else 0.0
        if self.reducer is not None:
            self.reducer.seconds = 0.0
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
            log.info("epoch %d over %d workers: %d events in %.2fs, %.0f events/s (%.2fs combining gradients); %d "
                     "events of the shards' tails not trained (lockstep)", epoch, self.comm.world, events, seconds,
                     figures["events_per_s"], figures["exchange_seconds"], figures["dropped_events"])
        self.status.update(epochs=self.status.value["epochs"] + [figures], digest=digest)


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

    ctx = RunContext(config, show_progress=False)
    phase = runner["phases"][0]
    reader = ctx.reader(phase)
    comm.barrier("data")  # reading may take long on one machine: meet on the store before any collective
    fingerprints = comm.all_gather_object(data_fingerprint(reader))
    if len(set(fingerprints)) > 1:
        differing = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
        raise UserError(f"the training data of worker(s) {differing} differs from worker 0's "
                        f"({config.dataset_of(phase)['data_path']}); every machine needs the same files")
    lockstep = LockstepReader(reader, comm)
    ctx.readers[config.phases[phase]["dataset_name"]] = lockstep
    reducer = gradient_combiner(runner, comm)
    # _EpochSync records each epoch's figures and parameter digest in the status file
    run_train(ctx, runner_name, shard=(rank, world), grad_reducer=reducer, is_chief=rank == 0,
              on_epoch=_EpochSync(comm, lockstep, status, reducer))


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

    def failed(message, exit_code, kind):
        status.update(state="failed", failed_at=time.time(),
                      error={"message": message, "exit_code": exit_code, "kind": kind})

    def stopped(signum, frame):
        raise _StoppedByLauncher()

    try:
        import paddle  # noqa: F401  (imported before the handler: Paddle installs its own on import)

        signal.signal(signal.SIGTERM, stopped)
        _train(job, status)
    except _StoppedByLauncher:
        failed("stopped by paddle.distributed.launch (another worker failed, or the job was cancelled)", 143,
               "stopped")
        return 143
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
    status.update(state="done")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
