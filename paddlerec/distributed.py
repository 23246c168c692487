"""Data-parallel training on several processes and machines, on Paddle's own distributed engine.

Runner classes
  local_cluster_train  `worker_num` worker processes on this machine;
  cluster_train        `nproc_per_node` workers on each of `nnodes` machines that meet at `master`.
Both start `python -m paddle.distributed.launch` themselves (the user still types only
`python -m paddlerec.run -m config.yaml`); every worker runs `python -m paddlerec.distributed`,
which is the same train loop (`runners.run_train`) on its shard of the sessions.

How the workers cooperate
  * Sessions are dealt out rank::world (the reader's `shard`); each worker plays its own
    session-parallel slots, so the union mini-batch of a step has world x batch_size rows.
  * Gradients are combined every mini-batch through Paddle's collectives (gloo on CPU, NCCL on
    GPU) in `Model.grad_reducer`: dense gradients are all-reduced and divided by the number of
    workers; the touched item rows and their gradients are all-gathered (padded to the longest)
    and divided likewise. Every loss is normalised by its worker's batch_size, so the mean makes
    the update the one a single process would make on the union mini-batch with its loss
    normalised by the union's size. Every worker applies the same combined update and so keeps
    identical parameters; this is checked after every epoch (a digest of all state).
  * Collectives need the same number of steps on every worker, but shards give slightly
    different numbers of mini-batches. Every worker trains the SMALLEST count over the workers
    of its mini-batches that hold at least 2 rows; the rest of each shard's tail (its last,
    shrinking mini-batches) is not trained in that epoch. On the 100k RSC15 split that is about
    0.1-0.4 % of the events, always the same ones; the count is logged every epoch.
  * Worker 0 (the chief) alone evaluates `eval_phase`, writes checkpoints, inference models and
    curves. The others wait for it on the job's key-value store, not inside a collective:
    gloo gives up a collective after 30 s, which a long evaluation would exceed.
  * Each worker writes `<log_dir>/status.<local index>.json` (state, pid, rank, per-epoch
    figures, parameter digest); paddle.distributed.launch writes its output to
    `<log_dir>/workerlog.<local index>`. The launcher's exit code is not trusted alone (it has
    been seen to exit 0 after workers crashed): success is every worker reporting "done".

Failure handling
  A worker that raises records the error and exits non-zero; one that is killed leaves its
  status at "running". The launcher then stops the others, and the runner raises one error that
  names the worker that failed first and its log. Workers die with the launcher
  (PR_SET_PDEATHSIG), the launcher dies with the runner's process, and the runner kills any
  worker still alive after the launcher ended, so nothing is left running.

Parameter-server strategies (async, sync, half_async, geo) are checked before anything starts:
the PyPI wheels lack Paddle's parameter-server core, and where a build has it, it trains
static-graph programs only, which this dygraph model is not.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

from .config import Config
from .errors import ConfigError, TrainingError, UserError

log = logging.getLogger(__name__)

PARAMETER_SERVER_STRATEGIES = ("async", "sync", "half_async", "geo")
JOB_FILE = "job.json"
LAUNCHER_LOG = "launcher.log"
STATUS_FILE = "status.{}.json"  # by local worker index, like the launcher's log names
WORKER_LOG = "workerlog.{}"  # what paddle.distributed.launch names local worker i's output
STOP_GRACE_SECONDS = 40  # the launcher gives its workers 30 s after SIGTERM before it kills them
POLL_SECONDS = 0.5
STORE_POLL_SECONDS = 0.05
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")


class DistributedError(UserError):
    """The distributed job failed or could not start; names the worker and its log."""

    exit_code = 1
    prefix = "distributed error"

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class PeerLost(UserError):
    """A collective or the job's store failed: another worker most likely stopped first."""

    exit_code = 1
    prefix = "distributed error"


class Terminated(UserError):
    exit_code = 143
    prefix = "error"


class _StoppedByLauncher(BaseException):
    """SIGTERM in a worker: the launcher stops the job (usually because another worker failed)."""


# ---- checks before anything starts (called by runners.prepare) ------------------------------

def parameter_server_problem(strategy):
    """Why a parameter-server strategy cannot train this model with the installed Paddle."""
    from paddle.base import core

    use_collective = ("set `distribute_strategy: collective` and `server_num: 0`: the workers then all-reduce "
                      "their gradients every mini-batch (gloo on CPU, NCCL on GPU)")
    # DistFleetWrapper is what Paddle's own parameter-server runtime (the_one_ps) instantiates
    if not hasattr(core, "DistFleetWrapper"):
        return (f"{strategy} is a parameter-server mode, and this paddlepaddle build has no parameter-server core "
                f"(paddle.base.core lacks DistFleetWrapper; the PyPI wheels are built without it); {use_collective}")
    return (f"{strategy} is a parameter-server mode; this paddlepaddle has the parameter-server core, but Paddle's "
            f"parameter server trains static-graph programs only and this model trains in dygraph with its own "
            f"row-sparse optimizer; {use_collective}")


def _check_common(runner_name, runner):
    key = f"runner.{runner_name}"
    strategy = runner["distribute_strategy"]
    if strategy in PARAMETER_SERVER_STRATEGIES:
        raise ConfigError(f"{key}.distribute_strategy", parameter_server_problem(strategy))
    if runner["server_num"]:
        raise ConfigError(f"{key}.server_num",
                          f"collective training has no parameter servers, got {runner['server_num']}; set 0")
    if "PADDLE_TRAINER_ID" in os.environ:
        # this process is itself a worker of some paddle.distributed.launch: launching again would nest jobs
        raise DistributedError(f"{key}: paddlerec.run is running inside a paddle.distributed.launch worker "
                               f"(PADDLE_TRAINER_ID is set); start `python -m paddlerec.run` directly, the runner "
                               f"launches its workers itself", exit_code=2)


def check_local_cluster_train(ctx, runner_name):
    _check_common(runner_name, ctx.config.runners[runner_name])


def check_cluster_train(ctx, runner_name):
    runner = ctx.config.runners[runner_name]
    _check_common(runner_name, runner)
    cluster_settings(runner_name, runner, os.environ)


def cluster_settings(runner_name, runner, environ):
    """master, nnodes, node_rank, nproc_per_node, host: from the config, else from the variables
    paddle.distributed.launch reads (PADDLE_MASTER, PADDLE_NNODES, PADDLE_RANK, PADDLE_NPROC_PER_NODE,
    POD_IP). The launcher then gets them all as arguments, with those variables removed."""
    key = f"runner.{runner_name}"

    def from_env(name, config_key):
        text = environ.get(name, "").strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}.{config_key}", f"left to the environment, but {name}={text!r} is not an "
                                                     f"integer") from None

    master = runner["master"] or environ.get("PADDLE_MASTER", "").strip()
    if not master:
        raise ConfigError(f"{key}.master", "empty and PADDLE_MASTER is not set; name node 0's address and a free "
                                           "port, e.g. \"10.0.0.1:8090\", the same on every machine")
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{key}.master", f"{master!r} is not HOST:PORT (e.g. \"10.0.0.1:8090\")")
    nnodes = runner["nnodes"] or from_env("PADDLE_NNODES", "nnodes")
    if not nnodes:
        raise ConfigError(f"{key}.nnodes", "0 and PADDLE_NNODES is not set; name the number of machines")
    if nnodes < 1:
        raise ConfigError(f"{key}.nnodes", f"must be >= 1, got {nnodes}")
    node_rank = runner["node_rank"]
    if node_rank < 0:
        env_rank = from_env("PADDLE_RANK", "node_rank")
        node_rank = env_rank if env_rank is not None else -1
    if node_rank >= nnodes:
        raise ConfigError(f"{key}.node_rank", f"{node_rank} is not below nnodes ({nnodes}); machines are numbered "
                                              f"0..{nnodes - 1}")
    nproc = runner["nproc_per_node"] or from_env("PADDLE_NPROC_PER_NODE", "nproc_per_node") or 1
    if nproc < 1:
        raise ConfigError(f"{key}.nproc_per_node", f"must be >= 1, got {nproc}")
    return {"master": master, "nnodes": nnodes, "node_rank": node_rank, "nproc": nproc,
            "host": runner["host"] or environ.get("POD_IP", "").strip()}


def _warn_if_unreachable(runner_name, settings):
    """paddle.distributed.launch announces this machine by what its hostname resolves to; on many
    Linux installs that is 127.0.1.1, which the other machines cannot reach."""
    if settings["host"] or settings["nnodes"] < 2:
        return
    master_host = settings["master"].rpartition(":")[0]
    try:
        announced = socket.gethostbyname(socket.getfqdn(socket.gethostname()))
    except OSError:
        announced = "127.0.0.1"  # what the launcher falls back to
    if announced.startswith("127.") and not master_host.startswith("127.") and master_host != "localhost":
        log.warning("runner.%s.host: this machine's name resolves to %s, which the other machines cannot reach; "
                    "set `host` to its network address", runner_name, announced)


# ---- the runners (the process the user started) -----------------------------------------------

def run_local_cluster_train(ctx, runner_name):
    runner = ctx.config.runners[runner_name]
    _Launch(ctx, runner_name, nproc=runner["worker_num"], cluster=None).run()


def run_cluster_train(ctx, runner_name):
    from .runners import StopMode

    runner = ctx.config.runners[runner_name]
    settings = cluster_settings(runner_name, runner, os.environ)
    _warn_if_unreachable(runner_name, settings)
    statuses = _Launch(ctx, runner_name, nproc=settings["nproc"], cluster=settings).run()
    if not any(s["rank"] == 0 for s in statuses.values()):
        return StopMode(f"{runner_name}: worker 0, which saved the checkpoints, ran on another machine; the runners "
                        f"after this one in `mode` run there")
    return None


def _launcher_environment(environ, package_root):
    """The runner's environment minus the variables paddle.distributed.launch would let override
    its command-line arguments (the runner passes every setting explicitly), with this package
    importable by the workers."""
    from paddle.distributed.launch.context.args_envs import env_args_mapping

    env = {k: v for k, v in environ.items() if k not in env_args_mapping}
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else []))
    return env


def _parent_death_signal(sig):
    """A function that asks Linux to send `sig` to the calling process when its parent dies
    (prctl PR_SET_PDEATHSIG). libc is resolved here, so that calling it right after a fork
    (Popen's preexec_fn) imports nothing."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def apply():
        if prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    return apply


def _threads_per_worker(config, runner, nproc):
    """`thread_num` is the job's CPU-thread budget on a machine; its workers share it."""
    phases = list(runner["phases"]) + ([runner["eval_phase"]] if runner["eval_phase"] else [])
    budget = max(config.phases[p]["thread_num"] for p in phases)
    return max(1, budget // nproc)


def _write_json(path, value):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [l.strip() for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1][:300] if lines else ""


def _pid_runs_job(pid, job_path):
    """Whether `pid` is alive and is one of this job's workers (its command line names the job file)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return job_path.encode() in f.read()
    except OSError:
        return False


class _LogRelay:
    """Forwards the log records of one worker's output file into this process's log."""

    def __init__(self, path, label):
        self.path, self.label = path, label
        self.offset = 0
        self.partial = b""

    def pump(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            match = _LOG_LINE.match(raw.decode("utf-8", "replace").rstrip("\r"))
            if match:
                log.log(getattr(logging, match.group(1)), "%s %s", self.label, match.group(2))


class _Launch:
    """One run of paddle.distributed.launch on this machine, watched until it ends."""

    def __init__(self, ctx, runner_name, nproc, cluster):
        self.ctx, self.runner_name, self.nproc, self.cluster = ctx, runner_name, nproc, cluster
        self.runner = ctx.config.runners[runner_name]
        self.log_dir = self.runner["log_dir"]
        self.job_path = os.path.join(self.log_dir, JOB_FILE)
        self.token = uuid.uuid4().hex

    def statuses(self):
        """{local index: this run's status dict, or None when the worker has not written one}."""
        out = {}
        for i in range(self.nproc):
            status = _read_json(os.path.join(self.log_dir, STATUS_FILE.format(i)))
            out[i] = status if status and status.get("token") == self.token else None
        return out

    def command(self):
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", self.log_dir, "--log_overwrite",
               "true", "--nproc_per_node", str(self.nproc)]
        if self.cluster:
            cmd += ["--master", self.cluster["master"], "--nnodes", str(self.cluster["nnodes"])]
            if self.cluster["node_rank"] >= 0:
                cmd += ["--rank", str(self.cluster["node_rank"])]
            if self.cluster["host"]:
                cmd += ["--host", self.cluster["host"]]
        # a training_script not ending in .py is run as it is, followed by its arguments
        return cmd + [sys.executable, "-m", "paddlerec.distributed", self.job_path]

    def run(self):
        config = self.ctx.config
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            _write_json(self.job_path, {
                "token": self.token, "runner": self.runner_name, "config": dataclasses.asdict(config),
                "threads": _threads_per_worker(config, self.runner, self.nproc), "log_dir": self.log_dir})
            launcher_log = open(os.path.join(self.log_dir, LAUNCHER_LOG), "w", encoding="utf-8")
        except OSError as exc:
            raise DistributedError(f"runner.{self.runner_name}.log_dir: cannot write {self.log_dir}: "
                                   f"{exc.strerror or exc}", exit_code=2) from None
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        where = (f"{self.nproc} worker(s) on this machine" if not self.cluster else
                 f"{self.nproc} worker(s) on this machine, one of {self.cluster['nnodes']} meeting at "
                 f"{self.cluster['master']}")
        log.info("%s: starting %s with paddle.distributed.launch; worker logs in %s", self.runner_name, where,
                 self.log_dir)
        restore = self._trap_termination()
        proc = None
        try:
            proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=launcher_log, stderr=subprocess.STDOUT,
                env=_launcher_environment(os.environ, package_root), start_new_session=True,
                preexec_fn=_parent_death_signal(signal.SIGTERM))
            code = self._watch(proc)
        finally:
            self._stop(proc)
            launcher_log.close()
            restore()
        return self._outcome(code)

    def _trap_termination(self):
        """SIGTERM/SIGHUP to this process end the job through the cleanup path, not abruptly."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            raise Terminated(f"{self.runner_name}: stopped by signal {signal.Signals(signum).name}; the workers "
                             f"were stopped too")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    def _watch(self, proc):
        """Relay worker 0's log until the launcher exits; stop the job if the workers do not all
        start (meet every other worker) within start_timeout. Returns the launcher's exit code."""
        deadline = time.monotonic() + self.runner["start_timeout"]
        relay = _LogRelay(os.path.join(self.log_dir, WORKER_LOG.format(0)), "[worker 0]" if not self.cluster else
                          "[local worker 0]")
        starting = True
        while True:
            code = proc.poll()
            relay.pump()
            if code is not None:
                return code
            if starting:
                waiting = [i for i, s in self.statuses().items() if s is None or s["state"] == "starting"]
                starting = bool(waiting)
                if waiting and time.monotonic() > deadline:
                    raise DistributedError(self._start_timeout_message(waiting))
            time.sleep(POLL_SECONDS)

    def _start_timeout_message(self, waiting):
        key = f"runner.{self.runner_name}"
        logs = ", ".join(os.path.join(self.log_dir, WORKER_LOG.format(i)) for i in waiting)
        if self.cluster and self.cluster["nnodes"] > 1:
            return (f"{key}: the workers did not meet within start_timeout ({self.runner['start_timeout']} s): is "
                    f"the same command running on all {self.cluster['nnodes']} machines, with master "
                    f"{self.cluster['master']} reachable from each? See {os.path.join(self.log_dir, LAUNCHER_LOG)} "
                    f"and {logs}")
        return (f"{key}: the workers did not start within start_timeout ({self.runner['start_timeout']} s); see "
                f"{os.path.join(self.log_dir, LAUNCHER_LOG)} and {logs}")

    def _stop(self, proc):
        """Make sure the launcher and every worker of this job are gone."""
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the launcher stops its workers on SIGTERM, then exits
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("%s: the launcher did not stop within %d s; killing it", self.runner_name,
                            STOP_GRACE_SECONDS)
                proc.kill()
                proc.wait()
        for i, status in self.statuses().items():
            if status and status.get("pid") and _pid_runs_job(status["pid"], self.job_path):
                log.warning("%s: worker %d (pid %d) outlived the launcher; killing it", self.runner_name, i,
                            status["pid"])
                try:
                    os.kill(status["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it ended between the check and the kill: what we wanted

    def _outcome(self, code):
        statuses = self.statuses()
        if code == 0 and all(s is not None and s["state"] == "done" for s in statuses.values()):
            self._log_summary(statuses)
            return statuses
        raise self._failure(code, statuses)

    def _failure(self, code, statuses):
        """One error naming the worker that most likely failed first, and its log."""
        key = f"runner.{self.runner_name}"

        def worker_log(i):
            return os.path.join(self.log_dir, WORKER_LOG.format(i))

        def name(i, status):
            rank = status.get("rank") if status else None
            if rank is None:
                return f"local worker {i}"
            return f"worker {rank} (local {i})" if self.cluster else f"worker {rank}"

        own = sorted((s["failed_at"], i) for i, s in statuses.items() if s and s["state"] == "failed"
                     and s["error"]["kind"] == "own")
        if own:
            i = own[0][1]
            error = statuses[i]["error"]
            return DistributedError(f"{key}: {name(i, statuses[i])} failed: {error['message']} (log: {worker_log(i)})",
                                    exit_code=error["exit_code"])
        silent = [i for i, s in statuses.items() if s is None or s["state"] in ("starting", "running")]
        if silent:
            i = silent[0]
            last = _last_line(worker_log(i))
            return DistributedError(f"{key}: {name(i, statuses[i])} stopped without reporting an error (killed by a "
                                    f"signal, out of memory, or crashed inside Paddle); see its log {worker_log(i)}"
                                    + (f" (last line: {last})" if last else ""))
        peers = sorted((s["error"]["kind"] == "stopped", s["failed_at"], i) for i, s in statuses.items()
                       if s and s["state"] == "failed")
        if peers:
            i = peers[0][2]
            elsewhere = ("; the worker that stopped first runs on another machine"
                         if self.cluster and self.cluster["nnodes"] > 1 else "")
            return DistributedError(f"{key}: {name(i, statuses[i])} failed: {statuses[i]['error']['message']}"
                                    f"{elsewhere} (log: {worker_log(i)})", exit_code=statuses[i]["error"]["exit_code"])
        return DistributedError(f"{key}: paddle.distributed.launch exited with code {code} although every worker "
                                f"finished; see {os.path.join(self.log_dir, LAUNCHER_LOG)}")

    def _log_summary(self, statuses):
        chief = next((s for s in statuses.values() if s["rank"] == 0), None)
        if chief and chief["epochs"]:
            last = chief["epochs"][-1]
            log.info("%s: %d workers, epoch %d: %d events in %.2fs (%.2fs combining gradients), %.0f events/s over "
                     "all workers (%d events of the shards' tails not trained); parameters identical on every worker "
                     "(digest %s)", self.runner_name, last["world"], last["epoch"], last["events"], last["seconds"],
                     last["exchange_seconds"], last["events_per_s"], last["dropped_events"], chief["digest"])


# ---- inside a worker ------------------------------------------------------------------------------

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
                                    "paddlerec/distributed.py or in the collective backend")
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
        _write_json(self.path, self.value)


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

    from . import runners

    config = Config(**job["config"])
    runner_name = job["runner"]
    runner = config.runners[runner_name]
    # set by paddle.distributed.launch for each worker it starts
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    runners.select_device(runner_name, runner["device"])
    if world > 1:
        dist.init_parallel_env()
    comm = Collective(world, rank)
    status.update(state="running", rank=rank, world=world)
    log.info("worker %d of %d on %s (pid %d, %s thread(s))", rank, world, socket.gethostname(), os.getpid(),
             os.environ.get("OMP_NUM_THREADS"))

    ctx = runners.RunContext(config, show_progress=False)
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
    reducer = CollectiveReducer(comm) if world > 1 else None
    # _EpochSync records each epoch's figures and parameter digest in the status file
    runners.run_train(ctx, runner_name, shard=(rank, world), grad_reducer=reducer, is_chief=rank == 0,
                      on_epoch=_EpochSync(comm, lockstep, status, reducer))


def _configure_worker_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def worker_main(argv=None):
    """Entry point of one worker: `python -m paddlerec.distributed <log_dir>/job.json` (the runner
    has paddle.distributed.launch start it)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m paddlerec.distributed JOB_JSON (started by the distributed runners)", file=sys.stderr)
        return 2
    # die with the launcher even if it is killed outright (no cleanup would reach us then)
    _parent_death_signal(signal.SIGKILL)()
    job = _read_json(args[0])
    if job is None:
        print(f"error: no job file {args[0]}", file=sys.stderr)
        return 2
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])  # Paddle reads it once, when imported below
    _configure_worker_logging()
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
