"""How training grows with threads and workers: events/s, Recall@20 and MRR@20.

    python bench/scaling.py [--runs 3] [--epochs 2] [--shapes 100k,full] [--max-threads N]
                            [--max-workers N] [--geo-steps 8,64,256,512] [--full-events 100000]
                            [--png scaling.png] [--json PATH] [--mkl-compare] [--workdir DIR]

Configurations, each trained and evaluated by `python -m paddlerec.run` (what a user runs) on
the config `--config` (default configs/xe_shared.yaml: batch 32, 100 units, 2048 negatives):
  1p x T    one process (class train, the fused kernel) with phase thread_num T, for every
            T = 1 .. --max-threads (default: the cores);
  sync W    class local_cluster_train, W workers x 1 thread, distribute_strategy sync
            (gradients averaged every mini-batch), W = 2 .. --max-workers (default: the cores);
  geo K W   the same with distribute_strategy geo, geo_steps K, for every K of --geo-steps.
Shapes:
  100k      the RSC15 100k split (--data: train_full -> test), converted into --workdir as
            bench/accuracy.py does (never into the repository: the data is CC BY-NC-ND);
            --epochs epochs per run;
  full      generated data of the full RSC15 training set's shape: 37,483 items with Zipf-like
            popularity (the law of bench/speed.py's full-shape worker), session lengths with the
            real mean, every item clicked at least once; --full-events training events (a
            bounded number of steps), --epochs epochs. Its Recall/MRR come from a generated test
            split of --full-test-events events drawn by the same law: the clicks carry no
            sequence, so they measure only how well popularity was learned (a sanity check,
            not an accuracy figure).
Figures per configuration, medians over --runs runs (seeds 42, 43, ...):
  events/s  training events per second over all workers (the slowest worker's train-loop
            time), of the epochs after the first (the first pays one-off costs), or of the
            only epoch; Recall@20 and MRR@20 of the last checkpoint on the shape's test split.
--mkl-compare adds one line per shape: 1 process x 1 thread with MKL_DEBUG_CPU_TYPE=5 (MKL's
AVX2 path, which csrc/kernel.py selects on AMD when the variable is unset) against the variable
set to an empty string (that selection disabled).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.accuracy import prepare_data  # noqa: E402
from bench.speed import FULL_EVENTS, FULL_ITEMS, FULL_SESSIONS  # noqa: E402

DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "rsc15_sessionrec_100k"))
TRAIN_TSV, TEST_TSV = "yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt"
SHAPES = ("100k", "full")
INFER_LINE = re.compile(r"infer \S+, epoch (\d+) .*Recall@20: ([0-9.]+).*MRR@20: ([0-9.]+)")
TRAIN, DIST, INFER = "scaling_train", "scaling_workers", "scaling_infer"


def parse_args(argv):
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="python bench/scaling.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder of the RSC15 100k TSV splits (default: %(default)s)")
    parser.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "paddlerec-scaling"),
                        help="converted and generated data, checkpoints, logs (default: %(default)s)")
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "xe_shared.yaml"),
                        help="model and batch settings (default: configs/xe_shared.yaml)")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (default: 3)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of 100k, full")
    parser.add_argument("--max-threads", type=int, default=cores, help="threads of 1 process: 1 .. N (default: cores)")
    parser.add_argument("--max-workers", type=int, default=cores, help="workers: 2 .. N (default: cores)")
    parser.add_argument("--geo-steps", default="8,64,256,512", help="geo_steps values (default: 8,64,256,512)")
    parser.add_argument("--no-sync", action="store_true", help="leave out the sync workers")
    parser.add_argument("--full-events", type=int, default=100_000,
                        help="training events of the generated full shape (default: %(default)s)")
    parser.add_argument("--full-test-events", type=int, default=5_000,
                        help="test events of the generated full shape (default: %(default)s)")
    parser.add_argument("--png", metavar="PATH", help="also plot events/s against threads and workers")
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    parser.add_argument("--mkl-compare", action="store_true",
                        help="add 1 process x 1 thread with MKL_DEBUG_CPU_TYPE=5 against it disabled")
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not args.shapes or any(s not in SHAPES for s in args.shapes):
        parser.error(f"--shapes: choose from {', '.join(SHAPES)}")
    try:
        args.geo_steps = [int(k) for k in args.geo_steps.split(",") if k.strip()]
    except ValueError:
        parser.error("--geo-steps: comma-separated integers, e.g. 1,8,64")
    if min([args.runs, args.epochs, args.max_threads, args.max_workers, args.full_events, args.full_test_events]
           + args.geo_steps) < 1:
        parser.error("counts must be >= 1")
    if "full" in args.shapes and args.full_events < 2 * FULL_ITEMS:
        parser.error(f"--full-events must be at least {2 * FULL_ITEMS} (twice the items: every item is clicked)")
    return args


# ---- data --------------------------------------------------------------------------------------

def full_shape_sessions(rng, n_events):
    """Sessions (lists of item ids) of the full RSC15 training set's shape with about n_events clicks."""
    weights = 1.0 / np.arange(1, FULL_ITEMS + 1) ** 0.9  # Zipf-like popularity, as bench/speed.py
    weights /= weights.sum()
    mean_length = FULL_EVENTS / FULL_SESSIONS
    lengths = 2 + rng.geometric(1.0 / (mean_length - 1), int(n_events / mean_length) + 1)
    items = rng.choice(FULL_ITEMS, size=int(lengths.sum()), p=weights)
    return items, lengths


def write_sessions(path, items, lengths):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ends = np.cumsum(lengths)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for start, end in zip(ends - lengths, ends):
            f.write(" ".join(map(str, items[start:end])) + "\n")
    os.replace(tmp, path)


def prepare_full_shape(workdir, n_train, n_test):
    """Generated train/test folders (reused when already written with the same sizes)."""
    folder = os.path.join(workdir, f"full-{n_train}-{n_test}")
    train, test = os.path.join(folder, "train"), os.path.join(folder, "test")
    if not (os.path.isfile(os.path.join(train, "sessions.txt")) and os.path.isfile(os.path.join(test, "sessions.txt"))):
        rng = np.random.default_rng(0)
        items, lengths = full_shape_sessions(rng, n_train)
        # every item clicked at least once, as in the real set: the model knows the whole catalogue
        missing = np.setdiff1d(np.arange(FULL_ITEMS), items)
        items[rng.choice(len(items), size=len(missing), replace=False)] = missing
        write_sessions(os.path.join(test, "sessions.txt"), *full_shape_sessions(rng, n_test))
        write_sessions(os.path.join(train, "sessions.txt"), items, lengths)
    return train, test, ""


def prepare_100k(data, workdir):
    for name in (TRAIN_TSV, TEST_TSV):
        if not os.path.isfile(os.path.join(data, name)):
            sys.exit(f"error: no {name} in {data}; pass --data with the RSC15 100k TSV splits, or --shapes full")
    folder = os.path.join(workdir, "100k")
    os.makedirs(folder, exist_ok=True)
    return prepare_data(os.path.join(data, TRAIN_TSV), os.path.join(data, TEST_TSV), folder)


def write_config(base_path, shape_dir, train, test, vocab):
    """The base config with its data pointed at one shape, a train, a workers and an infer runner."""
    import yaml

    with open(base_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config["workspace"] = REPO
    for dataset in config["dataset"]:
        dataset["data_path"] = test if "infer" in dataset["name"] or "test" in dataset["name"] else train
        dataset["vocab_path"] = vocab
    train_phase = next(p for p in config["phase"] if "train" in p["name"])
    infer_phase = next(p for p in config["phase"] if p is not train_phase)
    common = {"device": "cpu", "epochs": 1, "save_checkpoint_interval": 0, "save_checkpoint_path": "",
              "save_inference_interval": 0, "print_interval": 1000, "phases": [train_phase["name"]]}
    config["runner"] = [
        dict(name=TRAIN, **{"class": "train"}, **common),
        dict(name=DIST, **{"class": "local_cluster_train"}, worker_num=2, distribute_strategy="sync", geo_steps=8,
             log_dir="", **common),
        {"name": INFER, "class": "infer", "device": "cpu", "init_model_path": "", "predictions_path": "",
         "show_predictions": 0, "cutoffs": [20], "phases": [infer_phase["name"]]},
    ]
    config["mode"] = [TRAIN, INFER]
    path = os.path.join(shape_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path, train_phase["name"], infer_phase["name"]


# ---- runs --------------------------------------------------------------------------------------

def configurations(args):
    """(label, kind, threads or workers, strategy, geo_steps) in the order they are printed."""
    out = [(f"1p x {t}t", "threads", t, None, None) for t in range(1, args.max_threads + 1)]
    for w in range(2, args.max_workers + 1):
        if not args.no_sync:
            out.append((f"sync {w}w x 1t", "sync", w, "sync", None))
        out += [(f"geo K={k} {w}w x 1t", f"geo K={k}", w, "geo", k) for k in args.geo_steps]
    return out


def run_once(config, phases, conf, seed, epochs, folder, mkl=None):
    label, kind, count, strategy, geo_steps = conf
    train_phase, infer_phase = phases
    checkpoints = os.path.join(folder, "checkpoints")
    runner = TRAIN if strategy is None else DIST
    overrides = {"mode": f"[{runner},{INFER}]", "hyper_parameters.seed": seed,
                 f"runner.{runner}.epochs": epochs, f"runner.{runner}.save_checkpoint_path": checkpoints,
                 f"runner.{INFER}.init_model_path": checkpoints,
                 f"phase.{train_phase}.thread_num": count,  # one process: its threads; workers: 1 each
                 f"phase.{infer_phase}.thread_num": count}
    if strategy is not None:
        overrides.update({f"runner.{DIST}.worker_num": count, f"runner.{DIST}.distribute_strategy": strategy,
                          f"runner.{DIST}.log_dir": os.path.join(folder, "log")})
        if geo_steps:
            overrides[f"runner.{DIST}.geo_steps"] = geo_steps
    cmd = [sys.executable, "-m", "paddlerec.run", "-m", config, "--no-progress"]
    for key, value in overrides.items():
        cmd += ["-o", f"{key}={value}"]
    env = dict(os.environ, PYTHONPATH=REPO)
    if mkl is not None:
        env["MKL_DEBUG_CPU_TYPE"] = mkl
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: {label} (seed {seed}) failed, exit {result.returncode}:\n{result.stderr[-3000:]}")
    match = None
    for match in INFER_LINE.finditer(result.stderr):
        pass
    if match is None:
        sys.exit(f"error: {label} (seed {seed}): no evaluation line in its output:\n{result.stderr[-2000:]}")
    if strategy is None:
        with open(os.path.join(checkpoints, "curves.json"), encoding="utf-8") as f:
            rows = json.load(f)
    else:
        with open(os.path.join(folder, "log", "status.0.json"), encoding="utf-8") as f:
            rows = json.load(f)["epochs"]
    measured = rows[1:] or rows
    return {"events_per_s": statistics.median(r["events_per_s"] for r in measured),
            "exchange_seconds": statistics.median(r.get("exchange_seconds", 0.0) for r in measured),
            "recall@20": float(match.group(2)), "mrr@20": float(match.group(3)), "wall_seconds": wall}


def medians(rows):
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def plot(path, table, shapes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        series = {}
        for (s, conf), figures in table.items():
            if s == shape:
                series.setdefault(conf[1], []).append((conf[2], figures["events_per_s"]))
        one = next((f["events_per_s"] for (s, conf), f in table.items() if s == shape and conf[1] == "threads"
                    and conf[2] == 1), None)
        for kind, points in series.items():
            if kind != "threads" and one is not None:
                points.append((1, one))  # 1 worker is 1 process x 1 thread
            points.sort()
            name = "1 process x threads" if kind == "threads" else f"{kind}: workers x 1 thread"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_title(f"{shape}: training events/s (median)")
        ax.set_xlabel("threads (1 process) or workers (1 thread each)")
        ax.set_ylabel("events/s")
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.workdir, exist_ok=True)
    configs = {}
    for shape in args.shapes:
        shape_dir = os.path.join(args.workdir, shape)
        os.makedirs(shape_dir, exist_ok=True)
        data = prepare_100k(args.data, args.workdir) if shape == "100k" else \
            prepare_full_shape(args.workdir, args.full_events, args.full_test_events)
        configs[shape] = write_config(args.config, shape_dir, *data)
    confs = configurations(args)
    print(f"{len(confs)} configuration(s) x {len(args.shapes)} shape(s) x {args.runs} run(s), {args.epochs} epoch(s) "
          f"each; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    runs = []
    for repeat in range(args.runs):  # configurations interleaved, so that load drifts hit all of them alike
        seed = 42 + repeat
        for shape in args.shapes:
            config, *phases = configs[shape]
            jobs = [(conf, None) for conf in confs]
            if args.mkl_compare:
                jobs += [(("1p x 1t MKL_DEBUG_CPU_TYPE=5", "mkl", 1, None, None), "5"),
                         (("1p x 1t MKL AVX2 selection off", "mkl", 1, None, None), "")]
            for conf, mkl in jobs:
                folder = os.path.join(args.workdir, shape, "runs", re.sub(r"[^\w=.-]+", "_", conf[0]) + f"-{seed}")
                row = run_once(config, phases, conf, seed, args.epochs, folder, mkl)
                runs.append(dict(row, shape=shape, label=conf[0], seed=seed))
                print(f"{shape:5s} {conf[0]:24s} seed {seed}: {row['events_per_s']:8.0f} events/s (exchanging "
                      f"{row['exchange_seconds']:.1f}s/epoch), Recall@20 {row['recall@20']:.4f}, MRR@20 "
                      f"{row['mrr@20']:.4f}, wall {row['wall_seconds']:.0f}s", flush=True)

    table = {}
    all_confs = confs + ([("1p x 1t MKL_DEBUG_CPU_TYPE=5", "mkl", 1, None, None),
                          ("1p x 1t MKL AVX2 selection off", "mkl", 1, None, None)] if args.mkl_compare else [])
    for shape in args.shapes:
        for conf in all_confs:
            rows = [r for r in runs if r["shape"] == shape and r["label"] == conf[0]]
            table[(shape, conf)] = medians(rows)
    print(f"\nmedians of {args.runs} run(s), {args.epochs} epoch(s) each; load average at the end "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| shape | configuration | events/s | vs 1p x 1t | Recall@20 | MRR@20 |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        one = table[(shape, confs[0])]["events_per_s"]
        for conf in confs:
            r = table[(shape, conf)]
            print(f"| {shape} | {conf[0]} | {r['events_per_s']:.0f} | {r['events_per_s'] / one:.2f}x | "
                  f"{r['recall@20']:.4f} | {r['mrr@20']:.4f} |")
    if args.mkl_compare:
        print()
        for shape in args.shapes:
            on = table[(shape, all_confs[-2])]["events_per_s"]
            off = table[(shape, all_confs[-1])]["events_per_s"]
            print(f"MKL, {shape}, 1 process x 1 thread: MKL_DEBUG_CPU_TYPE=5 {on:.0f} events/s, selection off "
                  f"(MKL_DEBUG_CPU_TYPE=\"\") {off:.0f} events/s: {on / off:.2f}x")
    if args.png:
        plot(args.png, {k: v for k, v in table.items() if k[1][1] != "mkl"}, args.shapes)
        print(f"\nplot: {args.png}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
