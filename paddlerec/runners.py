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
from .files import atomic_file, save_error
from .loops import RunContext, build_model, evaluate_phase, select_device, train_epoch
from .metrics import format_metrics

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


def run_infer(ctx: RunContext, runner_name):
    """Evaluate each checkpoint under init_model_path (in epoch order) on each phase's data."""
    config = ctx.config
    runner = config.runners[runner_name]
    select_device(runner_name, runner["device"])
    key = f"runner.{runner_name}.init_model_path"
    paths = checkpoint.resolve(runner["init_model_path"], key, all_of_them=True)
    for phase_name in runner["phases"]:
        reader = ctx.reader(phase_name)
        labels = reader.info().labels
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
            started = time.perf_counter()
            metrics = evaluate_phase(ctx, phase_name, model, runner["cutoffs"], runner["tie_mode"], runner["topk"],
                                     predictions if wanted else None)
            seconds = time.perf_counter() - started
            log.info("infer %s, epoch %d (%s): %s, %.2fs", phase_name, meta["epoch"], path, format_metrics(metrics),
                     seconds)
            ctx.record(runner_name, "evaluations", dict(metrics, phase=phase_name, epoch=meta["epoch"],
                                                         checkpoint=path, seconds=seconds))
            for q, ids, _ in predictions.sorted_rows()[:runner["show_predictions"]]:
                log.info("session: %d, top %d items: [%s]", q, len(ids), ", ".join(predictions.names(ids)))
            if runner["predictions_path"]:
                out = os.path.join(runner["predictions_path"], f"{meta['epoch']}.txt")
                predictions.write(out)
                log.info("wrote %d sessions' top-%d to %s", len(predictions.rows), runner["topk"], out)


def run_serve(ctx: RunContext, runner_name):
    """Serve runner: answers HTTP until interrupted (see paddlerec/serve.py)."""
    from .serve import serve_runner

    serve_runner(ctx.config, runner_name)
