"""Distributed training on the 100k RSC15 split: events/s of 1 vs 2 workers, and their accuracy.

    python bench/distributed.py [--data DIR] [--workdir DIR] [--epochs 2] [--repeats 3]
                                [--settings fused,fused-union,ref-1,ref-2,sync-2,geo-2]

Every run is what a user types, `python -m paddlerec.run -m CONFIG -o ...`, on the config that
`sh data_prepare.sh --prepared DIR` writes for the split (the repository config's
hyper_parameters and batch size), followed by its cpu_infer_runner on the test split.

Settings (the same seeds 42, 43, ... for each):
  fused        single process, class train, fused C++ step (context: the fast path)
  fused-union  the same with batch_size x 2: the union mini-batch the 2 workers train on
  ref-1        class local_cluster_train, worker_num 1, reference (Paddle operator) step
  ref-2        class local_cluster_train, worker_num 2, reference step: the gradients of the
               two workers are averaged every mini-batch (distribute_strategy sync)
  sync-2       the same with the fused kernel (its two operators, the exchange between them)
  geo-2        worker_num 2, distribute_strategy geo (geo_steps: the config's), fused kernel
bench/scaling.py measures threads and workers more widely (and on the full-catalogue shape).
ref-1 vs ref-2 is the fair scaling figure (same step implementation, same 2-thread budget of
the phase's thread_num, split between the workers). events/s: median over the runs of each run's
epochs after the first (the first pays one-off costs), or of its only epoch; for ref-2 it counts
the events of both workers over the slower worker's train-loop time. Recall@20 / MRR@20: the
last checkpoint on the test split, mean and range over the runs (the run-to-run spread).

The data is converted into --workdir (default ~/.cache/paddlerec-bench-distributed), never into
the repository (the YooChoose data is CC BY-NC-ND).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "rsc15_sessionrec_100k"))
SETTINGS = ("fused", "fused-union", "ref-1", "ref-2", "sync-2", "geo-2")
METRICS = re.compile(r"infer \S+, epoch (\d+) .*Recall@20: ([0-9.]+).*MRR@20: ([0-9.]+)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/distributed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder of the GRU4Rec TSV splits (default: %(default)s)")
    parser.add_argument("--workdir",
                        default=os.path.join(os.path.expanduser("~"), ".cache", "paddlerec-bench-distributed"),
                        help="converted data, checkpoints and logs (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, seeds 42, 43, ... (default: 3)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated subset of " + ", ".join(SETTINGS))
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be >= 1")
    return args


def prepare_data(data, workdir):
    """data_prepare.sh converts the TSV splits and writes a config for them (skips work already done)."""
    if not os.path.isdir(data):
        sys.exit(f"error: no data folder {data}; pass --data with the 100k RSC15 TSV splits")
    out = os.path.join(workdir, "data")
    result = subprocess.run(["sh", os.path.join(REPO, "data_prepare.sh"), "--prepared", data, "--out", out],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    if result.returncode != 0:
        sys.exit(f"error: data_prepare.sh failed:\n{result.stderr[-2000:]}")
    return os.path.join(out, "config.yaml")


def batch_size_of(config_path):
    sys.path.insert(0, REPO)
    from paddlerec.config import load_config

    return load_config(config_path).datasets["dataset_train"]["batch_size"]


def run_once(config_path, setting, seed, epochs, folder, batch_size):
    """One training run and its evaluation; returns the run's figures."""
    distributed = setting.startswith(("ref-", "sync-", "geo-"))
    runner = "local_cluster_train_runner" if distributed else "cpu_train_runner"
    checkpoints = os.path.join(folder, "checkpoints")
    overrides = {
        "mode": f"[{runner},cpu_infer_runner]",
        "hyper_parameters.seed": seed,
        "hyper_parameters.kernel": "reference" if setting.startswith("ref-") else "fused",
        f"runner.{runner}.epochs": epochs,
        f"runner.{runner}.save_checkpoint_path": checkpoints,
        f"runner.{runner}.save_checkpoint_interval": 0,
        f"runner.{runner}.save_inference_interval": 0,
        "runner.cpu_infer_runner.init_model_path": checkpoints,
        "runner.cpu_infer_runner.predictions_path": "",
        "runner.cpu_infer_runner.show_predictions": 0,
    }
    if distributed:
        overrides[f"runner.{runner}.worker_num"] = int(setting.split("-")[1])
        overrides[f"runner.{runner}.log_dir"] = os.path.join(folder, "log")
        overrides[f"runner.{runner}.distribute_strategy"] = "geo" if setting.startswith("geo-") else "sync"
    if setting == "fused-union":
        overrides["dataset.dataset_train.batch_size"] = 2 * batch_size
    cmd = [sys.executable, "-m", "paddlerec.run", "-m", config_path, "--no-progress"]
    for key, value in overrides.items():
        cmd += ["-o", f"{key}={value}"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: {setting} (seed {seed}) failed, exit {result.returncode}:\n{result.stderr[-3000:]}")
    match = METRICS.search(result.stderr)
    if not match:
        sys.exit(f"error: {setting} (seed {seed}): no evaluation line in its output:\n{result.stderr[-2000:]}")
    if distributed:
        with open(os.path.join(folder, "log", "status.0.json"), encoding="utf-8") as f:
            epochs_rows = json.load(f)["epochs"]
    else:
        with open(os.path.join(checkpoints, "curves.json"), encoding="utf-8") as f:
            epochs_rows = json.load(f)
    measured = epochs_rows[1:] or epochs_rows
    return {"setting": setting, "seed": seed, "epoch": int(match.group(1)), "recall@20": float(match.group(2)),
            "mrr@20": float(match.group(3)), "events_per_s": statistics.median(r["events_per_s"] for r in measured),
            "exchange_seconds": statistics.median(r.get("exchange_seconds", 0.0) for r in measured),
            "epoch_seconds": statistics.median(r["seconds"] for r in measured),
            "dropped_events": epochs_rows[-1].get("dropped_events", 0), "wall_seconds": wall}


def spread(values, fmt):
    mean = statistics.fmean(values)
    return f"{fmt.format(mean)} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.workdir, exist_ok=True)
    config_path = prepare_data(args.data, args.workdir)
    batch_size = batch_size_of(config_path)
    print(f"data: {args.data} -> {os.path.dirname(config_path)}; batch_size {batch_size}; {args.epochs} epoch(s) "
          f"per run; {args.repeats} run(s) per setting; load average at start {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} CPUs)", flush=True)
    runs = []
    for repeat in range(args.repeats):  # settings interleaved, so that load drifts hit all of them alike
        seed = 42 + repeat
        for setting in args.settings:
            folder = os.path.join(args.workdir, "runs", f"{setting}-seed{seed}")
            row = run_once(config_path, setting, seed, args.epochs, folder, batch_size)
            runs.append(row)
            print(f"{setting:12s} seed {seed}: {row['events_per_s']:8.0f} events/s (epoch {row['epoch_seconds']:.1f}s,"
                  f" gradient exchange {row['exchange_seconds']:.1f}s), Recall@20 {row['recall@20']:.4f}, MRR@20 "
                  f"{row['mrr@20']:.4f}, {row['dropped_events']} events not trained, wall {row['wall_seconds']:.0f}s",
                  flush=True)

    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; {args.epochs} epoch(s), {args.repeats} run(s) each")
    print(f"{'setting':12s} {'events/s median [min..max]':>30s} {'Recall@20 mean [min..max]':>28s} "
          f"{'MRR@20 mean [min..max]':>28s}")
    medians = {}
    for setting in args.settings:
        rows = [r for r in runs if r["setting"] == setting]
        rates = [r["events_per_s"] for r in rows]
        medians[setting] = statistics.median(rates)
        recall = spread([r["recall@20"] for r in rows], "{:.4f}")
        mrr = spread([r["mrr@20"] for r in rows], "{:.4f}")
        print(f"{setting:12s} {medians[setting]:10.0f} [{min(rates):.0f}..{max(rates):.0f}]".ljust(44)
              + f"{recall:>28s} {mrr:>28s}")
    if "ref-1" in medians and "ref-2" in medians:
        print(f"2 workers / 1 worker (reference step): {medians['ref-2'] / medians['ref-1']:.2f}x events/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
