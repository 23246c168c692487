"""Accuracy of a config on GRU4Rec-format TSV splits, through the path a user runs.

    python bench/accuracy.py --train TRAIN.tsv --test TEST.tsv [--config FILE] [-o KEY=VALUE ...]

Steps: data/convert_format.py (TSV -> one session per line, original ids) ->
data/text2paddle.py (vocab from the training split, model ids) -> the config's `mode`
(its train runner, then its infer runner) with the data paths and output folders
pointed at a work folder. Ends with one line:

    recall@20=R mrr@20=M targets=N train_events_per_s=E

R and M are those of the last checkpoint; E is the median events/s of the epochs after
the first (the first pays one-off costs), or of the only epoch.
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from paddlerec import logs  # noqa: E402
from paddlerec.config import load_config  # noqa: E402
from paddlerec.errors import DataError, UserError  # noqa: E402

PATH_KEYS = {"save_checkpoint_path": "checkpoints", "init_model_path": "checkpoints",
             "save_inference_path": "inference", "predictions_path": "predictions"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/accuracy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training split (TSV with SessionId, ItemId, Time)")
    parser.add_argument("--test", required=True, help="test split (same format)")
    parser.add_argument("--config", default=os.path.join(REPO, "config.yaml"), help="config (default: config.yaml)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for paddlerec.run (repeatable)")
    parser.add_argument("--workdir", help="keep converted data and checkpoints here (default: a temporary folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", metavar="PATH", help="also write every epoch's and evaluation's figures here")
    parser.add_argument("--no-predictions", action="store_true",
                        help="evaluate only (rank every target, as the official evaluation does): no top-K lists")
    return parser.parse_args(argv)


def check_tsv(path, what):
    if not os.path.isfile(path):
        raise DataError(f"--{what}: no such file: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    missing = [c for c in ("SessionId", "ItemId", "Time") if c not in header]
    if missing:
        raise DataError(f"--{what}: {path}:1: the header lacks {', '.join(missing)} (a GRU4Rec TSV starts with "
                        f"SessionId<TAB>ItemId<TAB>Time)")


def run_step(args, what):
    """Run one data script as a user would; its own one-line error becomes ours."""
    result = subprocess.run([sys.executable] + args, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        error = UserError(f"{what} failed: {message}")
        error.exit_code = result.returncode  # 2 for bad input, as the script said
        raise error
    return result


def prepare_data(train_tsv, test_tsv, work):
    converted = os.path.join(work, "converted")
    os.makedirs(converted, exist_ok=True)
    run_step([os.path.join(REPO, "data", "convert_format.py"), train_tsv, os.path.join(converted, "train.txt")],
             "convert_format.py (train)")
    run_step([os.path.join(REPO, "data", "convert_format.py"), test_tsv, os.path.join(converted, "test.txt")],
             "convert_format.py (test)")
    run_step([os.path.join(REPO, "data", "text2paddle.py"), "--out-dir", work, "--train",
              os.path.join(converted, "train.txt"), "--test", os.path.join(converted, "test.txt")], "text2paddle.py")
    return os.path.join(work, "all_train"), os.path.join(work, "all_test"), os.path.join(work, "vocab.txt")


def data_overrides(config, train_dir, test_dir, vocab, work, predictions=True):
    """Point the runners in `mode` at the prepared data and the work folder."""
    overrides = []
    for runner_name in config.mode:
        runner = config.runners[runner_name]
        if runner["class"] == "infer" and not predictions:
            overrides += [f"runner.{runner_name}.predictions_path=", f"runner.{runner_name}.show_predictions=0",
                          f"runner.{runner_name}.list_metrics=false"]
        data_dir = test_dir if runner["class"] == "infer" else train_dir
        for phase in runner["phases"]:
            dataset = config.phases[phase]["dataset_name"]
            overrides += [f"dataset.{dataset}.data_path={data_dir}", f"dataset.{dataset}.vocab_path={vocab}"]
        if runner.get("eval_phase"):
            dataset = config.phases[runner["eval_phase"]]["dataset_name"]
            overrides += [f"dataset.{dataset}.data_path={test_dir}", f"dataset.{dataset}.vocab_path={vocab}"]
        for key, folder in PATH_KEYS.items():
            if runner.get(key):  # only what the config uses; an empty init_model_path stays empty
                overrides.append(f"runner.{runner_name}.{key}={os.path.join(work, folder)}")
    return overrides


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure()
    work = args.workdir or tempfile.mkdtemp(prefix="gru4rec-accuracy-")
    try:
        check_tsv(args.train, "train")
        check_tsv(args.test, "test")
        config = load_config(args.config, args.override, check_files=False)  # a bad config fails before any work
        started = time.perf_counter()
        train_dir, test_dir, vocab = prepare_data(os.path.abspath(args.train), os.path.abspath(args.test), work)
        shutil.rmtree(os.path.join(work, "checkpoints"), ignore_errors=True)
        config = load_config(args.config, args.override + data_overrides(config, train_dir, test_dir, vocab, work,
                                                                     not args.no_predictions))
        from paddlerec.run import set_threads

        set_threads(config)
        from paddlerec.loops import RunContext
        from paddlerec.mode import run

        ctx = RunContext(config, show_progress=not args.no_progress)
        run(ctx)
        epochs = [row for result in ctx.results.values() for row in result.get("epochs", [])]
        evaluations = [row for result in ctx.results.values() for row in result.get("evaluations", [])]
        if not epochs or not evaluations:
            raise UserError("the config's mode must train and then infer (e.g. mode: [cpu_train_runner, cpu_infer_runner])")
        speeds = [row["events_per_s"] for row in epochs]
        speed = statistics.median(speeds[1:] if len(speeds) > 1 else speeds)
        final = evaluations[-1]
        logging.info("total time %.1fs (train %.1fs)", time.perf_counter() - started, sum(r["seconds"] for r in epochs))
        if "recall@20" not in final:
            raise UserError("the infer runner's cutoffs must include 20")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"epochs": epochs, "evaluations": evaluations, "train_events_per_s": speed}, f, indent=1,
                          default=str)
        print(f"recall@20={final['recall@20']:.4f} mrr@20={final['mrr@20']:.4f} targets={final['targets']} "
              f"train_events_per_s={speed:.0f}", flush=True)
    except UserError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
