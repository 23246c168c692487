"""What the distributed launcher (paddlerec/launch.py) and its workers (paddlerec/worker.py)
share: the files of a job in `log_dir`, and dying with one's parent.

    job.json         written by the launcher: token, runner name, the whole Config, threads, log_dir
    status.<i>.json  written by local worker i at every change: token, state (starting, running,
                     done, failed), pid, rank, world, host, per-epoch figures, parameter digest,
                     error {message, exit_code, kind: own | peer | stopped}, failed_at
    workerlog.<i>    local worker i's output (paddle.distributed.launch writes it)
    launcher.log     paddle.distributed.launch's own output
A status whose token is not the job's is an earlier run's and is ignored.
"""

import json
import sys

from .files import write_json

JOB_FILE = "job.json"
LAUNCHER_LOG = "launcher.log"
STATUS_FILE = "status.{}.json"  # by local worker index, like the launcher's log names
WORKER_LOG = "workerlog.{}"  # what paddle.distributed.launch names local worker i's output

__all__ = ["JOB_FILE", "LAUNCHER_LOG", "STATUS_FILE", "WORKER_LOG", "read_json", "write_json",
           "parent_death_signal"]


def read_json(path):
    """The JSON value in `path`, or None when there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def parent_death_signal(sig):
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
