"""The run functions of the single-process runner classes (train, infer, serve).

paddlerec/registry.py names them; paddlerec/mode.py calls them in `mode`'s order. They train
and evaluate only through the one train loop and the one evaluation loop (paddlerec/loops.py);
the distributed workers (paddlerec/worker.py) run `run_train` on their shard.
"""

import gc
import logging
import os
import time
import uuid
from typing import Callable, Optional

from . import checkpoint, curves, export
from .contract import DataInfo
from .errors import CheckpointError, TrainingError
from .files import atomic_file, save_error, write_text
from .loops import RunContext, build_model, evaluate_phase, select_device, train_epoch
from .baselines import Pop, make_baseline
from .logs import results
from .metrics import ListMetrics, comparison_table, format_metrics, metrics_files

log = logging.getLogger(__name__)

# what a train runner's per-epoch evaluation (eval_phase) measures for the curves
EPOCH_EVAL = {"cutoffs": (1, 5, 10, 20), "tie_mode": "standard", "topk": 20}


def restore_for_training(ctx, runner_name, phase_name, hparams, data):
    """A fresh model, or (incremental training) one restored from init_model_path.

    Returns (model, last epoch done, run id): a continued run keeps the id of the run it continues."""
    runner = ctx.config.runners[runner_name]
    model = build_model(ctx, phase_name, hparams, data)
    if not runner["init_model_path"]:
        earlier = checkpoint.list_checkpoints(runner["save_checkpoint_path"])
        if earlier:
            log.warning("%s already holds checkpoints (epochs %s) of an earlier run; this new run's replace those "
                        "of the same epochs, and resuming or evaluating from the folder takes this run's only",
                        runner["save_checkpoint_path"], ", ".join(str(e) for e, _ in earlier))
        return model, 0, uuid.uuid4().hex
    key = f"runner.{runner_name}.init_model_path"
    path = checkpoint.resolve(runner["init_model_path"], key)[0]
    meta = checkpoint.read_meta(path)
    checkpoint.check_signature(meta, model, path)
    checkpoint.load_into(model, path)
    log.info("continuing from %s (epoch %d)", path, meta["epoch"])
    return model, int(meta["epoch"]), meta.get("run_id") or uuid.uuid4().hex


def run_train(ctx: RunContext, runner_name, shard=(0, 1), grad_reducer=None, is_chief=True,
              on_epoch: Optional[Callable] = None):
    """Train runner; distributed runners call it with their shard, gradient reducer and rank."""
    config = ctx.config
    runner = config.runners[runner_name]
    phase_name = runner["phases"][0]
    select_device(runner_name, runner["device"])
    hparams = ctx.hyper_parameters(phase_name)
    reader = ctx.reader(phase_name)
    data = reader.info()
    batch_size = ctx.batch_size(phase_name)
    model, start_epoch, run_id = restore_for_training(ctx, runner_name, phase_name, hparams, data)
    model.grad_reducer = grad_reducer
    meta = {"hyper_parameters": hparams, "data": {"n_items": data.n_items}, "run_id": run_id,
            "model_file": config.phases[phase_name]["model"], "config": config.path, "runner": runner_name}
    title = f"{runner_name}: {phase_name}" + (f", evaluated on {runner['eval_phase']}" if runner["eval_phase"] else "")
    history = curves.History(runner["save_checkpoint_path"], start_epoch, title) if is_chief else None
    # the progress bar's total: a session of L clicks trains on L - 1 events (a shard gets about its share)
    total_events = None
    if data.item_support is not None:
        total_events = max(int(data.item_support.sum()) - reader.n_queries, 0) // shard[1]
    last_epoch = start_epoch + runner["epochs"]
    # what exists now (Paddle's modules, the model, the data) lives to the end: keep the cyclic
    # garbage collector from rescanning it during the epochs
    gc.freeze()
    newest = checkpoint.resolve(runner["init_model_path"], "")[0] if runner["init_model_path"] else None
    for epoch in range(start_epoch + 1, last_epoch + 1):
        batches = reader.batches(batch_size, training=True, shard=shard)
        try:
            result = train_epoch(model, batches, batch_size, epoch, runner["print_interval"],
                                 ctx.show_progress and is_chief, total_events)
        except TrainingError as exc:  # say which checkpoint to continue from
            raise TrainingError(f"{exc}. Newest checkpoint: {newest or 'none yet'}") from None
        log.info("epoch %d done, use time: %.2fs, global metrics: loss %.5f, events %d, batches %d, %.0f events/s",
                 epoch, result.seconds, result.loss, result.events, result.steps, result.events_per_s)
        row = {"epoch": epoch, "loss": result.loss, "events": result.events, "seconds": result.seconds,
               "events_per_s": result.events_per_s}
        if runner["eval_phase"] and is_chief:
            metrics = evaluate_phase(ctx, runner["eval_phase"], model, **EPOCH_EVAL)
            log.info("epoch %d eval on %s: %s", epoch, runner["eval_phase"], format_metrics(metrics))
            row.update({k: v for k, v in metrics.items() if k != "targets"})
        ctx.record(runner_name, "epochs", row)
        if is_chief:
            last = epoch == last_epoch
            every = runner["save_checkpoint_interval"]
            if last or (every and epoch % every == 0):
                path = newest = checkpoint.save_checkpoint(runner["save_checkpoint_path"], epoch, model, meta)
                log.info("saved checkpoint %s", path)
            every = runner["save_inference_interval"]
            if every and (last or epoch % every == 0):  # config.py made sure save_inference_path is set
                path = _export(runner, epoch, model, dict(meta, phase=phase_name,
                                                          dataset=config.phases[phase_name]["dataset_name"]), data)
                log.info("saved inference model %s", path)
            try:
                history.add(row)
            except OSError as exc:  # the curves share the checkpoints' disk: a full one stops here too
                raise save_error(f"the training curves in {runner['save_checkpoint_path']}", exc,
                                 ". Checkpoints saved so far are complete.") from None
        if on_epoch is not None:
            on_epoch(epoch, model, result)
    return model


def _export(runner, epoch, model, meta, data):
    """Inference model `<save_inference_path>/<epoch>` (paddlerec/export.py); SaveError when it cannot be written."""
    root = runner["save_inference_path"]
    training = {k: meta[k] for k in ("hyper_parameters", "run_id", "model_file", "config", "runner", "phase",
                                      "dataset")}
    try:
        return export.write_export(root, epoch, model, runner["topk"], data.labels, training=training, data=data)
    except OSError as exc:
        raise save_error(os.path.join(root, str(epoch)), exc, ". Earlier inference models are untouched.") from None


# ---- evaluation ----------------------------------------------------------------------------

class Predictions:
    """Collects every query's top-K and writes them, sorted by query, as TSV."""

    def __init__(self, labels):
        self.labels = labels
        self.rows = []

    def __call__(self, out):
        for q, ids, scores in zip(out.query_ids, out.topk_ids, out.topk_scores):
            self.rows.append((int(q), ids, scores))

    def names(self, ids):
        return [self.labels[i] for i in ids] if self.labels is not None else [str(int(i)) for i in ids]

    def sorted_rows(self):
        return sorted(self.rows, key=lambda r: r[0])

    def write(self, path):
        """TSV sorted by session, written atomically; SaveError when it cannot be written."""
        try:
            with atomic_file(path) as f:
                f.write("session\titems\tscores\n")
                for q, ids, scores in self.sorted_rows():
                    f.write(f"{q}\t{' '.join(self.names(ids))}\t{' '.join(f'{s:.6g}' for s in scores)}\n")
        except OSError as exc:
            raise save_error(path, exc) from None


def model_name(module, path):
    """The name results are printed under: the model file's MODEL_NAME, else the first word of
    its docstring ("GRU4Rec on Paddle: ..." gives GRU4Rec), else the file's name."""
    name = getattr(module, "MODEL_NAME", None)
    if not name and module.__doc__ and module.__doc__.split():
        name = module.__doc__.split()[0].strip(":,.")
    return name or os.path.basename(path)


def run_infer(ctx: RunContext, runner_name):
    """Evaluate each checkpoint under init_model_path (in epoch order) on each phase's data and,
    with a train_phase, the popularity baseline (POP) on the same targets; print one table per
    phase (results), write the metrics files and the predictions."""
    config = ctx.config
    runner = config.runners[runner_name]
    select_device(runner_name, runner["device"])
    key = f"runner.{runner_name}.init_model_path"
    paths = checkpoint.resolve(runner["init_model_path"], key, all_of_them=True)
    train_info = ctx.reader(runner["train_phase"]).info() if runner["train_phase"] else None
    cutoffs, tie_mode, topk = runner["cutoffs"], runner["tie_mode"], runner["topk"]
    rows = []  # every evaluation, for metrics_path
    for phase_name in runner["phases"]:
        reader = ctx.reader(phase_name)
        labels = reader.info().labels
        table = []  # (name, metrics) printed at the end of the phase
        predictions = None
        for path in paths:
            meta = checkpoint.read_meta(path)
            hparams = ctx.hyper_parameters(phase_name, meta["hyper_parameters"])
            n_items = int(meta["data"]["n_items"])
            if labels is not None and len(labels) != n_items:
                raise CheckpointError(f"{path}: the model knows {n_items} items but the vocab of phase {phase_name} "
                                      f"has {len(labels)}; use the vocab the model was trained with")
            model = build_model(ctx, phase_name, hparams, DataInfo(n_items=n_items, labels=labels))
            checkpoint.check_signature(meta, model, path)
            checkpoint.load_into(model, path, with_optimizer=False)
            wanted = bool(runner["predictions_path"] or runner["show_predictions"])
            predictions = Predictions(labels)
            clicks = train_info.item_support if train_info is not None else model.known_items()
            lists = ListMetrics(cutoffs, clicks, with_popularity=train_info is not None) \
                if runner["list_metrics"] else None
            started = time.perf_counter()
            metrics = evaluate_phase(ctx, phase_name, model, cutoffs, tie_mode, topk,
                                     predictions if wanted else None, lists)
            seconds = time.perf_counter() - started
            log.info("infer %s, epoch %d (%s): %s, %.2fs", phase_name, meta["epoch"], path, format_metrics(metrics),
                     seconds)
            name = model_name(ctx.model_module(phase_name), config.phases[phase_name]["model"])
            table.append((f"{name}, epoch {meta['epoch']}", metrics))
            row = dict(runner=runner_name, phase=phase_name, model=name, epoch=meta["epoch"], checkpoint=path)
            rows.append(dict(row, **metrics, seconds=round(seconds, 4)))
            ctx.record(runner_name, "evaluations", dict(metrics, phase=phase_name, epoch=meta["epoch"],
                                                         checkpoint=path, seconds=seconds))
            if runner["predictions_path"]:
                out = os.path.join(runner["predictions_path"], f"{meta['epoch']}.txt")
                predictions.write(out)
                log.info("wrote %d sessions' top-%d to %s", len(predictions.rows), topk, out)
        if train_info is not None:
            baseline = Pop(train_info)
            lists = ListMetrics(cutoffs, train_info.item_support) if runner["list_metrics"] else None
            metrics = evaluate_phase(ctx, phase_name, baseline, cutoffs, tie_mode, topk, None, lists)
            if metrics["targets"] != table[-1][1]["targets"]:
                log.warning("POP ranks %d targets of %s but the model %d: is train_phase %s the data the model was "
                            "trained on?", metrics["targets"], phase_name, table[-1][1]["targets"],
                            runner["train_phase"])
            table.append((f"{baseline.name} (baseline)", metrics))
            rows.append(dict(runner=runner_name, phase=phase_name, model=baseline.name, epoch="", checkpoint="",
                             **metrics))
            ctx.record(runner_name, "baselines", dict(metrics, phase=phase_name, model=baseline.name))
        report_phase(phase_name, reader, table, tie_mode, cutoffs)
        if predictions is not None:
            for q, ids, _ in predictions.sorted_rows()[:runner["show_predictions"]]:
                results.info("session: %d, top %d items: [%s]", q, len(ids), ", ".join(predictions.names(ids)))
        if runner["metrics_path"]:
            write_metrics(runner["metrics_path"], rows)


def report_phase(phase_name, reader, table, tie_mode, cutoffs):
    """The phase's comparison table on the results stream: the metrics at the largest cutoff."""
    k = max(cutoffs)
    keys = [key for key in (f"recall@{k}", f"mrr@{k}", f"ndcg@{k}", f"coverage@{k}", f"popularity@{k}")
            if any(key in m for _, m in table)]
    targets = table[0][1]["targets"] if table else 0
    results.info("%s: %s targets in %s sessions, each ranked against every item seen in training (ties: %s)",
                 phase_name, f"{targets:,}", f"{reader.n_queries:,}", tie_mode)
    for line in comparison_table(table, keys):
        results.info("%s", line)


def write_metrics(folder, rows):
    text_json, text_csv = metrics_files(rows)
    for name, text in (("metrics.json", text_json + "\n"), ("metrics.csv", text_csv)):
        path = os.path.join(folder, name)
        try:
            write_text(path, text)
        except OSError as exc:
            raise save_error(path, exc) from None
    log.info("wrote every evaluation's metrics to %s (metrics.json, metrics.csv)", folder)


def run_baseline(ctx: RunContext, runner_name):
    """Baseline runner: fit each baseline on train_phase, evaluate it on every phase through the
    evaluation loop the model uses (same targets, same ties), print one table per phase."""
    config = ctx.config
    runner = config.runners[runner_name]
    train_phase = runner["train_phase"]
    train_reader = ctx.reader(train_phase)
    info = train_reader.info()
    options = {key: runner[key] for key in ("spop_top_n", "knn_n_sims", "knn_lambda", "knn_alpha")}
    baselines = []
    for name in runner["baselines"]:
        started = time.perf_counter()
        baseline = make_baseline(name, info, options)
        baseline.fit(train_reader.batches(ctx.batch_size(train_phase), training=True))
        log.info("%s fitted on %s in %.2fs", baseline.name, train_phase, time.perf_counter() - started)
        baselines.append(baseline)
    cutoffs, tie_mode, topk = runner["cutoffs"], runner["tie_mode"], runner["topk"]
    rows = []
    for phase_name in runner["phases"]:
        table = []
        for baseline in baselines:
            started = time.perf_counter()
            metrics = evaluate_phase(ctx, phase_name, baseline, cutoffs, tie_mode, topk, None,
                                     ListMetrics(cutoffs, info.item_support))
            seconds = time.perf_counter() - started
            log.info("%s on %s: %s, %.2fs", baseline.name, phase_name, format_metrics(metrics), seconds)
            table.append((baseline.name, metrics))
            rows.append(dict(runner=runner_name, phase=phase_name, model=baseline.name, **metrics,
                             seconds=round(seconds, 4)))
            ctx.record(runner_name, "evaluations", dict(metrics, phase=phase_name, model=baseline.name,
                                                         seconds=seconds))
        report_phase(phase_name, ctx.reader(phase_name), table, tie_mode, cutoffs)
        if runner["metrics_path"]:
            write_metrics(runner["metrics_path"], rows)


def run_serve(ctx: RunContext, runner_name):
    """Serve runner: answers HTTP until interrupted (see paddlerec/serve.py)."""
    from .serve import serve_runner

    serve_runner(ctx.config, runner_name)
