"""Training/evaluation speed, peak memory and accuracy of the shipped configs.

    python bench/speed.py --train TRAIN.tsv --test TEST.tsv [--runs 3] [--epochs 10]
                          [--setting NAME=CONFIG[,KEY=VALUE...] ...] [--full-shape-steps 300]

Each setting is trained and evaluated by bench/accuracy.py in a fresh process (the path a
user runs), `--runs` times. Printed per setting, as the median over runs:
  train events/s  real (input, next click) pairs per second, median of the epochs after the first
  eval targets/s  test targets ranked against all items per second (as the official evaluation:
                  no top-K lists)
  peak RSS        the process's peak resident memory
  Recall@20, MRR@20 after the last epoch, so a speed-up cannot hide an accuracy loss.
Then the time one epoch of the full RSC15 training set (31.6M events, 37,483 items) would
take with the first setting, measured by training on generated data of that shape for a
bounded number of steps (not extrapolated from the small split).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SETTINGS = [
    "xe_shared=configs/xe_shared.yaml",
    "xe_shared_b512=configs/xe_shared.yaml,dataset.dataset_train.batch_size=512",
    "bprmax_shared=configs/bprmax_shared.yaml",
]
FULL_EVENTS, FULL_ITEMS, FULL_SESSIONS = 31_637_239, 37_483, 7_966_257  # RSC15 train_full (official preprocessing)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/speed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training split (GRU4Rec TSV)")
    parser.add_argument("--test", required=True, help="test split (GRU4Rec TSV)")
    parser.add_argument("--setting", action="append", metavar="NAME=CONFIG[,KEY=VALUE...]",
                        help="a config and its overrides (repeatable; default: xe_shared, xe_shared at batch 512, "
                             "bprmax_shared)")
    parser.add_argument("--runs", type=int, default=3, help="runs per setting (default 3)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    parser.add_argument("--full-shape-steps", type=int, default=300,
                        help="steps trained on the generated full-RSC15-shaped data (0: skip)")
    parser.add_argument("--full-shape-worker", nargs=2, metavar=("CONFIG", "STEPS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure_setting(name, spec, args):
    config, *overrides = spec.split(",")
    rows = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="gru4rec-speed-") as tmp:
            result_path = os.path.join(tmp, "result.json")
            cmd = [sys.executable, os.path.join(REPO, "bench", "accuracy.py"), "--train", args.train, "--test",
                   args.test, "--config", os.path.join(REPO, config), "--no-progress", "--no-predictions",
                   "--json", result_path,
                   "-o", f"runner.cpu_train_runner.epochs={args.epochs}"]
            for override in overrides:
                cmd += ["-o", override]
            # a fresh process per run: its own peak memory, no state carried over
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            out, err = proc.stdout.read(), proc.stderr.read()
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"{name}: run {run + 1} failed: {(err.strip().splitlines() or ['?'])[-1]}")
            with open(result_path) as f:
                result = json.load(f)
        final = result["evaluations"][-1]
        row = {"events_per_s": result["train_events_per_s"], "eval_targets_per_s": final["targets"] / final["seconds"],
               "eval_seconds": final["seconds"], "peak_mib": usage.ru_maxrss / 1024, "recall": final["recall@20"],
               "mrr": final["mrr@20"], "targets": final["targets"]}
        rows.append(row)
        print(f"  {name} run {run + 1}: {row['events_per_s']:.0f} train events/s, eval {row['eval_seconds']:.3f}s "
              f"({row['eval_targets_per_s']:.0f} targets/s), peak {row['peak_mib']:.0f} MiB, "
              f"Recall@20 {row['recall']:.4f}, MRR@20 {row['mrr']:.4f}", flush=True)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def full_shape_worker(config_path, steps):
    """Train `steps` mini-batches on generated data shaped like the full RSC15 training set."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.path.insert(0, REPO)
    import numpy as np

    import model as model_module
    import rsc15_reader
    from paddlerec.config import load_config
    from paddlerec.contract import DataInfo
    from paddlerec.params import validate_section

    config = load_config(config_path, check_files=False)
    hparams = validate_section(config.hyper_parameters, model_module.HYPER_PARAMETERS, "hyper_parameters")
    batch_size = config.datasets["dataset_train"]["batch_size"]
    rng = np.random.default_rng(0)
    # item popularity: Zipf-like over 37,483 items, scaled to 31.6M clicks (for sampling and logQ)
    weights = 1.0 / np.arange(1, FULL_ITEMS + 1) ** 0.9
    weights /= weights.sum()
    support = np.maximum(rng.multinomial(FULL_EVENTS, weights), 5)
    # enough sessions for `steps` steady-state steps; lengths with the real mean (31.6M / 7.97M ~ 3.97)
    n_sessions = steps * batch_size
    lengths = 2 + rng.geometric(1.0 / (FULL_EVENTS / FULL_SESSIONS - 1), n_sessions)
    items = rng.choice(FULL_ITEMS, size=int(lengths.sum()), p=weights)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sessions = rsc15_reader.Sessions(items.astype(np.int64), offsets)
    model = model_module.Model(hparams, DataInfo(n_items=FULL_ITEMS, item_support=support))
    model.begin_epoch(1, True)
    model.sampler.take(1)  # the first draw of the sample store is a one-off cost
    gc.freeze()  # as the train runner does: the long-lived objects are not rescanned during the steps
    done_steps = done_events = 0
    warmup = 20
    started = None
    steps_per_call = rsc15_reader.Reader.STEPS_PER_BATCH  # as the train runner hands them to the model
    for batch in rsc15_reader.chunk_steps(rsc15_reader.session_parallel_steps(sessions, batch_size, False),
                                          steps_per_call):
        model.train_step(batch, batch_size)
        done_steps += batch.n_steps
        if started is None and done_steps >= warmup:
            started, done_steps, done_events = time.perf_counter(), 0, 0
            continue
        if started is not None:
            done_events += int(batch.step_events.sum())
            if done_steps >= steps:
                break
    seconds = time.perf_counter() - started
    print(json.dumps({"events_per_s": done_events / seconds, "steps": done_steps, "events": done_events}))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.full_shape_worker:
        full_shape_worker(args.full_shape_worker[0], int(args.full_shape_worker[1]))
        return 0
    settings = args.setting or DEFAULT_SETTINGS
    print(f"{args.runs} run(s) x {args.epochs} epochs per setting on {args.train}", flush=True)
    results = {}
    for entry in settings:
        name, _, spec = entry.partition("=")
        results[name] = measure_setting(name, spec, args)
    print("\n| setting | train events/s | eval targets/s (s) | peak RSS | Recall@20 | MRR@20 |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['events_per_s']:.0f} | {r['eval_targets_per_s']:.0f} ({r['eval_seconds']:.3f} s) | "
              f"{r['peak_mib']:.0f} MiB | {r['recall']:.4f} | {r['mrr']:.4f} |")
    if args.full_shape_steps:
        name, _, spec = settings[0].partition("=")
        config = os.path.join(REPO, spec.split(",")[0])
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--train", args.train, "--test", args.test,
                               "--full-shape-worker", config, str(args.full_shape_steps)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"full-shape run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        shape = json.loads(proc.stdout.strip().splitlines()[-1])
        hours = FULL_EVENTS / shape["events_per_s"] / 3600
        print(f"\nfull RSC15 shape ({FULL_EVENTS:,} events, {FULL_ITEMS:,} items), {name}: "
              f"{shape['events_per_s']:.0f} events/s over {shape['steps']} steps -> one epoch ~ {hours:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
