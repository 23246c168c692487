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
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log warnings and errors only (results are still printed)")
    parser.add_argument("--log-file", metavar="PATH",
                        help="also write the log and the results, in order, to this file")
    return parser.parse_args(argv)


def configure_logging(quiet, log_file=None):
    """Results (metrics, recommendations, the summary) on stdout; the log on stderr. Returns
    the error line when log_file cannot be written, else None."""
    try:
        logs.configure(quiet, log_file)
    except OSError as exc:
        return f"error: --log-file: cannot write {log_file}: {exc.strerror or exc}"
    return None


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
    problem = configure_logging(args.quiet, args.log_file)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    config = None
    try:
        config = load_config(args.model, args.override)
        set_threads(config)
        warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
        import_paddle_quietly()
        from .loops import RunContext
        from .mode import run
        from .summary import summary_lines

        ctx = RunContext(config, show_progress=not args.no_progress)
        with sigterm_raises():  # after Paddle's import, which installs its own handler
            run(ctx)
        for line in summary_lines(ctx):
            logs.results.info("%s", line)
    except Terminated:
        newest = newest_checkpoints(config) if config is not None else "none yet"
        ending(args.log_file, f"terminated (SIGTERM); nothing is half-written; newest complete checkpoint: {newest}")
        return Terminated.exit_code
    except UserError as exc:
        ending(args.log_file, f"{exc.prefix}: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        ending(args.log_file, "interrupted; the last saved checkpoint is complete")
        return 130
    return 0


def ending(log_file, line):
    """The one line a failed run ends with: on stderr, and in the log file, which holds the whole run."""
    print(line, file=sys.stderr)
    if log_file:
        try:
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass  # the line is on stderr; a log file that cannot take it was reported when opened


if __name__ == "__main__":
    sys.exit(main())
