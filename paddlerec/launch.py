"""The distributed runner classes: launch the workers, watch them, report one outcome.

Runner classes (paddlerec/registry.py names the functions here)
  local_cluster_train  `worker_num` worker processes on this machine;
  cluster_train        `nproc_per_node` workers on each of `nnodes` machines that meet at `master`.
Both start `python -m paddle.distributed.launch` themselves (the user still types only
`python -m paddlerec.run -m config.yaml`); every worker runs `python -m paddlerec.worker`
(paddlerec/worker.py: how the workers train together), which is the same train loop
(`runners.run_train`) on its shard of the sessions. Launcher and workers talk only through
the files of paddlerec/job.py.

What the launcher trusts
  Each worker writes `<log_dir>/status.<local index>.json`; paddle.distributed.launch writes
  its output to `<log_dir>/workerlog.<local index>`. The launcher's exit code is not trusted
  alone (it has been seen to exit 0 after workers crashed): success is every worker reporting
  "done". Worker 0's log records are relayed into this process's log as they come.

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
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

from . import logs
from .config import cpu_threads
from .errors import ConfigError, DistributedError, Terminated
from .job import JOB_FILE, LAUNCHER_LOG, STATUS_FILE, WORKER_LOG, parent_death_signal, read_json, write_json
from .loops import StopMode

log = logging.getLogger(__name__)

PARAMETER_SERVER_STRATEGIES = ("async", "sync", "half_async", "geo")
STOP_GRACE_SECONDS = 40  # the launcher gives its workers 30 s after SIGTERM before it kills them
POLL_SECONDS = 0.5


# ---- checks before anything starts (called by mode.prepare) ---------------------------------

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


def _threads_per_worker(config, runner, nproc):
    """`thread_num` is the job's CPU-thread budget on a machine; its workers share it."""
    phases = list(runner["phases"]) + ([runner["eval_phase"]] if runner["eval_phase"] else [])
    budget = max(cpu_threads(config.phases[p]["thread_num"]) for p in phases)
    return max(1, budget // nproc)


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
            record = logs.parse_line(raw.decode("utf-8", "replace"))
            if record:
                log.log(record[0], "%s %s", self.label, record[1])


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
            status = read_json(os.path.join(self.log_dir, STATUS_FILE.format(i)))
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
        return cmd + [sys.executable, "-m", "paddlerec.worker", self.job_path]

    def run(self):
        config = self.ctx.config
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            write_json(self.job_path, {
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
                preexec_fn=parent_death_signal(signal.SIGTERM))
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
