"""`python -m paddlerec.run -m config.yaml [-o KEY=VALUE ...]`: run the runners named in `mode`.

Exit codes: 0 done; 2 invalid config or input (one line on stderr, no traceback);
1 a run that failed (NaN loss, disk full, ...); 130 interrupted (Ctrl-C); 143 stopped by SIGTERM.
"""

import argparse
import contextlib
import io
import os
import sys
import warnings

from . import logs
from .config import cpu_threads, load_config, used_phases
from .errors import UserError
from .termination import Terminated, newest_checkpoints, sigterm_raises


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m paddlerec.run",
        description="Train, evaluate and continue a model as a YAML config describes (see README).")
    parser.add_argument("-m", "--model", required=True, metavar="CONFIG",
                        help="config YAML, or a folder holding config.yaml")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted; list entries by name, e.g. "
                             "runner.cpu_train_runner.epochs=1); VALUE is YAML. Repeatable.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log lines stay)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return parser.parse_args(argv)


def configure_logging(quiet):
    logs.configure(quiet)


def set_threads(config):
    """Paddle reads OMP_NUM_THREADS once, when it is imported; it must be set before that."""
    threads = max([cpu_threads(config.phases[p]["thread_num"]) for p in used_phases(config)] or [1])
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # numpy's own BLAS threads would only spin beside Paddle's: numpy does no heavy algebra here
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("GLOG_minloglevel", "2")


# Paddle's import-time notices that say nothing to a user of this runner: the OMP_NUM_THREADS one
# is about data-parallel jobs (set_threads sets the variable on purpose), and ccache only matters
# to whoever rebuilds the C++ kernel.
PADDLE_NOTICES = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


def import_paddle_quietly():
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        import paddle  # noqa: F401
    for line in captured.getvalue().splitlines():
        if not line.startswith(PADDLE_NOTICES):
            print(line, file=sys.stderr)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.quiet)
    config = None
    try:
        config = load_config(args.model, args.override)
        set_threads(config)
        warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
        import_paddle_quietly()
        from .loops import RunContext
        from .mode import run

        with sigterm_raises():  # after Paddle's import, which installs its own handler
            run(RunContext(config, show_progress=not args.no_progress))
    except Terminated:
        newest = newest_checkpoints(config) if config is not None else "none yet"
        print(f"terminated (SIGTERM); nothing is half-written; newest complete checkpoint: {newest}", file=sys.stderr)
        return Terminated.exit_code
    except UserError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last saved checkpoint is complete", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
