"""Baselines and GRU4Rec on the same split, the same targets and the same evaluation: one table.

    python bench/compare.py [--train TRAIN.tsv --test TEST.tsv] [--config LABEL=FILE ...]

Defaults: the RSC15 100k split (../shared/data/rsc15_sessionrec_100k, train_full -> test) and
the two measured GRU4Rec settings, configs/xe_shared.yaml and configs/bprmax_shared.yaml.

Steps: the TSV splits are converted as a user's would be (bench/accuracy.py: convert_format.py,
then text2paddle.py: vocab from the training split, model ids); config.yaml's baseline_runner
fits POP, S-POP and item-kNN on the training split; each GRU4Rec config trains and its infer
runner evaluates the last checkpoint. Every row comes from paddlerec.loops.evaluate on the same
test targets with the same tie mode; the metrics follow session-rec (paddlerec/metrics.py).
Prints a Markdown table (README's comparison table is its output) and, with --json, writes
every figure.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accuracy import check_tsv, data_overrides, prepare_data  # noqa: E402
from paddlerec.config import load_config  # noqa: E402
from paddlerec.errors import UserError  # noqa: E402
from paddlerec.metrics import display_name  # noqa: E402

SPLIT = os.path.join(REPO, "..", "shared", "data", "rsc15_sessionrec_100k", "yoochoose-clicks-100k_{}.txt")
CONFIGS = ["GRU4Rec cross-entropy=configs/xe_shared.yaml", "GRU4Rec BPR-max=configs/bprmax_shared.yaml"]
COLUMNS = ("recall@20", "mrr@20", "ndcg@20", "coverage@20", "popularity@20")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default=SPLIT.format("train_full"), help="training split (GRU4Rec TSV)")
    parser.add_argument("--test", default=SPLIT.format("test"), help="test split (GRU4Rec TSV)")
    parser.add_argument("--config", action="append", metavar="LABEL=FILE",
                        help=f"a GRU4Rec config to train and evaluate, repeatable (default: {'; '.join(CONFIGS)})")
    parser.add_argument("--baselines", default="pop,spop,iknn", help="baselines to run (default: pop,spop,iknn)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every GRU4Rec config (e.g. runner.cpu_train_runner.epochs=1)")
    parser.add_argument("--workdir", help="keep the converted data and checkpoints here (default: a temporary folder)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def run_config(config, show_progress):
    from paddlerec.loops import RunContext
    from paddlerec.mode import run

    ctx = RunContext(config, show_progress=show_progress)
    run(ctx)
    return ctx


def baseline_rows(train_dir, test_dir, vocab, work, baselines, show_progress):
    overrides = ["mode=[baseline_runner]", f"runner.baseline_runner.baselines=[{baselines}]",
                 f"runner.baseline_runner.metrics_path={os.path.join(work, 'baselines')}",
                 f"dataset.dataset_train.data_path={train_dir}", f"dataset.dataset_train.vocab_path={vocab}",
                 f"dataset.dataset_infer.data_path={test_dir}", f"dataset.dataset_infer.vocab_path={vocab}"]
    ctx = run_config(load_config(os.path.join(REPO, "config.yaml"), overrides), show_progress)
    return [(row["model"], row, "") for row in ctx.results["baseline_runner"]["evaluations"]]


def model_row(label, path, train_dir, test_dir, vocab, work, overrides, show_progress):
    base = load_config(path, overrides, check_files=False)
    folder = os.path.join(work, os.path.splitext(os.path.basename(path))[0])
    extra = data_overrides(base, train_dir, test_dir, vocab, folder, predictions=False)
    infer = [name for name in base.mode if base.runners[name]["class"] == "infer"]
    train = [name for name in base.mode if base.runners[name]["class"] == "train"]
    if len(infer) != 1 or len(train) != 1:
        raise UserError(f"{path}: its mode must train once and then infer (e.g. [cpu_train_runner, cpu_infer_runner])")
    # the train runner's phase is the model's training data: the infer runner's POP and Popularity@K count it
    extra.append(f"runner.{infer[0]}.train_phase={base.runners[train[0]]['phases'][0]}")
    extra.append(f"runner.{infer[0]}.list_metrics=true")  # Coverage@K and Popularity@K: no predictions, but the lists
    shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)
    started = time.perf_counter()
    ctx = run_config(load_config(path, overrides + extra), show_progress)
    epochs = ctx.results[train[0]]["epochs"]
    final = ctx.results[infer[0]]["evaluations"][-1]
    note = f"`{os.path.relpath(path, REPO)}`, {len(epochs)} epochs"
    logging.info("%s done in %.0fs", label, time.perf_counter() - started)
    return label, final, note


def markdown(rows, targets):
    lines = [f"| model | {' | '.join(display_name(c) for c in COLUMNS)} | notes |",
             "|---|" + "---|" * len(COLUMNS) + "---|"]
    for label, metrics, note in rows:
        cells = " | ".join(f"{metrics[c]:.4f}" if c in metrics else "-" for c in COLUMNS)
        lines.append(f"| {label} | {cells} | {note} |")
    lines.append(f"\n{targets:,} test targets, each ranked against every item of the training split (standard ties).")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    work = args.workdir or tempfile.mkdtemp(prefix="gru4rec-compare-")
    try:
        check_tsv(args.train, "train")
        check_tsv(args.test, "test")
        configs = []
        for text in args.config or CONFIGS:
            label, sep, path = text.rpartition("=")
            path = path if os.path.isabs(path) else os.path.join(REPO, path)
            configs.append((label if sep else os.path.basename(path), path))
            load_config(path, args.override, check_files=False)  # a bad config fails before any work
        from paddlerec.run import set_threads

        set_threads(load_config(configs[0][1], args.override, check_files=False))
        train_dir, test_dir, vocab = prepare_data(os.path.abspath(args.train), os.path.abspath(args.test), work)
        rows = baseline_rows(train_dir, test_dir, vocab, work, args.baselines, not args.no_progress)
        for label, path in configs:
            rows.append(model_row(label, path, train_dir, test_dir, vocab, work, args.override, not args.no_progress))
        targets = {row["targets"] for _, row, _ in rows}
        if len(targets) != 1:
            raise UserError(f"the rows ranked different numbers of targets ({sorted(targets)}); they must share a split")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump([dict(metrics, label=label, note=note) for label, metrics, note in rows], f, indent=1,
                          default=str)
        print(markdown(rows, targets.pop()), flush=True)
    except UserError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
