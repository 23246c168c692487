"""The runners: one train loop and one evaluation loop, shared by every runner class.

`prepare()` does all checking that needs the model and reader files (hyper-parameters,
devices, reading the data) before any runner starts; `run()` then runs `mode` in order.
"""

import errno
import gc
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from . import checkpoint, curves
from .config import Config
from .contract import DataInfo
from .errors import CheckpointError, ConfigError, TrainingError, UserError
from .metrics import RankMetrics, format_metrics
from .params import validate_section
from .plugins import PluginError, load_file, where
from .progress import progress_bar

log = logging.getLogger(__name__)

MODEL_REQUIRED = ("HYPER_PARAMETERS", "Model")
READER_REQUIRED = ("Reader",)


@dataclass
class RunContext:
    """What the runners share within one `paddlerec.run`: the config and everything loaded for it."""

    config: Config
    show_progress: bool = True
    readers: Dict[str, object] = field(default_factory=dict)  # dataset name -> Reader
    # what each runner measured: {runner: {"epochs": [per-epoch rows], "evaluations": [per-checkpoint rows]}}
    results: Dict[str, dict] = field(default_factory=dict)

    def record(self, runner_name, kind, row):
        self.results.setdefault(runner_name, {}).setdefault(kind, []).append(row)

    def model_module(self, phase_name):
        phase = self.config.phases[phase_name]
        return load_file(phase["model"], "model file", f"phase.{phase_name}.model", MODEL_REQUIRED)

    def hyper_parameters(self, phase_name, values=None):
        """The config's hyper_parameters (or `values`) checked against the model's declaration."""
        module = self.model_module(phase_name)
        source = self.config.hyper_parameters if values is None else values
        return validate_section(source, module.HYPER_PARAMETERS, "hyper_parameters", _legacy_hints())

    def reader(self, phase_name):
        name = self.config.phases[phase_name]["dataset_name"]
        if name not in self.readers:
            dataset = self.config.datasets[name]
            module = load_file(dataset["data_converter"], "reader file", f"dataset.{name}.data_converter",
                               READER_REQUIRED)
            started = time.perf_counter()
            try:
                self.readers[name] = module.Reader(dataset["data_path"], dataset["vocab_path"])
            except UserError:
                raise
            except Exception as exc:
                raise PluginError(f"dataset.{name}: the reader file failed on {dataset['data_path']} at "
                                  f"{where(exc, dataset['data_converter'])}: {type(exc).__name__}: {exc}") from exc
            reader = self.readers[name]
            log.info("dataset %s: %d sessions from %s (%.1fs)", name, reader.n_queries, dataset["data_path"],
                     time.perf_counter() - started)
        return self.readers[name]

    def batch_size(self, phase_name):
        return self.config.dataset_of(phase_name)["batch_size"]


def _legacy_hints():
    from .config import LEGACY_HINTS

    return LEGACY_HINTS


def select_device(runner_name, device):
    import paddle

    if device == "gpu":
        if not paddle.is_compiled_with_cuda():
            raise ConfigError(f"runner.{runner_name}.device",
                              "gpu, but the installed paddlepaddle has no CUDA support; install the GPU build "
                              "of paddlepaddle (https://www.paddlepaddle.org.cn/install) or set `device: cpu`")
        paddle.set_device("gpu")
    else:
        paddle.set_device("cpu")


def prepare(ctx: RunContext):
    """Check everything that needs the model/reader files, before any work starts."""
    import paddle

    config = ctx.config
    for runner_name in config.mode:  # checks that need paddle itself (e.g. distributed strategies), before any data
        check = RUNNER_CHECKS.get(config.runners[runner_name]["class"]) or _registered(runner_name, config).check_function()
        if check is not None:
            check(ctx, runner_name)
    for runner_name in config.mode:
        runner = config.runners[runner_name]
        if runner["device"] == "gpu" and not paddle.is_compiled_with_cuda():
            select_device(runner_name, "gpu")  # raises the explanatory error
        if runner["class"] in ("train", "infer") and runner.get("init_model_path"):
            check_init_path(config, runner_name)
        for phase_name in runner.get("phases", []) + ([runner["eval_phase"]] if runner.get("eval_phase") else []):
            ctx.model_module(phase_name)
            if runner["class"] != "infer":
                ctx.hyper_parameters(phase_name)
            ctx.reader(phase_name)


def _registered(runner_name, config):
    """The registry's entry of a runner's class (classes declared only there, e.g. tune)."""
    from .registry import RUNNER_CLASSES as REGISTERED

    return REGISTERED[config.runners[runner_name]["class"]]


def check_init_path(config, runner_name):
    """init_model_path must exist already, or be the save_checkpoint_path (or a checkpoint in it)
    of a runner that runs earlier in `mode`: a typo must not cost a whole training first."""
    path = config.runners[runner_name]["init_model_path"]
    if os.path.exists(path):
        return
    for earlier in config.mode[:config.mode.index(runner_name)]:
        root = config.runners[earlier].get("save_checkpoint_path")
        if root and (path == root or os.path.dirname(path) == root):
            return
    raise CheckpointError(f"runner.{runner_name}.init_model_path: {path} does not exist; train first (a train "
                          f"runner with save_checkpoint_path) or point it at a checkpoint")


@dataclass
class StopMode:
    """A runner returns this to end `mode` in this process (e.g. a cluster machine that does not
    hold the checkpoints: the machine that does runs the rest)."""

    reason: str


def run(ctx: RunContext):
    prepare(ctx)
    for runner_name in ctx.config.mode:
        runner = ctx.config.runners[runner_name]
        started = time.perf_counter()
        log.info("runner %s (%s) starts", runner_name, runner["class"])
        outcome = (RUNNER_CLASSES.get(runner["class"]) or _registered(runner_name, ctx.config).run_function())(
            ctx, runner_name)
        log.info("runner %s done in %.1fs", runner_name, time.perf_counter() - started)
        if isinstance(outcome, StopMode):
            log.info("%s", outcome.reason)
            break


# ---- training ------------------------------------------------------------------------------

@dataclass
class EpochResult:
    loss: float  # mean loss per training event
    events: int  # real (input, next click) pairs trained on
    steps: int  # mini-batches
    seconds: float

    @property
    def events_per_s(self):
        return self.events / self.seconds if self.seconds > 0 else 0.0


def train_epoch(model, batches, batch_size, epoch, print_interval, show_progress, total_events=None) -> EpochResult:
    """The one train loop: feed every batch to the model, log, stop on a non-finite loss."""
    model.begin_epoch(epoch, True, batch_size)
    events = 0
    steps = 0
    loss_sum = 0.0  # sum over mini-batches of loss * batch_size = sum of per-event losses
    started = time.perf_counter()
    bar = progress_bar(show_progress, total=total_events, desc=f"epoch {epoch}", unit="ev")
    with bar:
        for batch in batches:
            losses = np.asarray(model.train_step(batch), dtype=np.float64)
            step_events = np.asarray(batch.step_events, dtype=np.int64)
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                at = steps + int(bad[0]) + 1
                raise TrainingError(
                    f"epoch {epoch}, batch {at}: the loss is {losses[bad[0]]}; training stopped and the last saved "
                    f"checkpoint is kept. Lower hyper_parameters.optimizer.learning_rate (or momentum), or check "
                    f"`loss`, `bpreg`, `logq` and `elu_param`")
            for i in range(len(losses)):
                steps += 1
                events += int(step_events[i])
                loss_sum += float(losses[i]) * batch_size
                if steps % print_interval == 0:
                    elapsed = time.perf_counter() - started
                    log.info("epoch %d batch %d: loss %.5f, events %d, %.0f events/s", epoch, steps,
                             loss_sum / max(events, 1), events, events / max(elapsed, 1e-9))
            bar.update(int(step_events.sum()))
            bar.set_postfix_str(f"loss {loss_sum / max(events, 1):.4f}", refresh=False)
    seconds = time.perf_counter() - started
    return EpochResult(loss=loss_sum / max(events, 1), events=events, steps=steps, seconds=seconds)


def build_model(ctx, phase_name, hparams, data: DataInfo):
    module = ctx.model_module(phase_name)
    try:
        return module.Model(hparams, data)
    except UserError:
        raise
    except Exception as exc:
        raise PluginError(f"phase.{phase_name}.model: building the model failed at "
                          f"{where(exc, ctx.config.phases[phase_name]['model'])}: {type(exc).__name__}: {exc}") from exc


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
            metrics = evaluate_phase(ctx, runner["eval_phase"], model, cutoffs=(1, 5, 10, 20), tie_mode="standard",
                                     topk=20)
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
                path = checkpoint.export_inference(runner["save_inference_path"], epoch, model, runner["topk"],
                                                   data.labels)
                log.info("saved inference model %s", path)
            try:
                history.add(row)
            except OSError as exc:  # the curves share the checkpoints' disk: a full one stops here too
                hint = "free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder"
                raise checkpoint.SaveError(f"cannot write the training curves in {runner['save_checkpoint_path']}: "
                                           f"{exc.strerror or exc}; {hint}. Checkpoints saved so far are complete.") from None
        if on_epoch is not None:
            on_epoch(epoch, model, result)
    return model


# ---- evaluation ----------------------------------------------------------------------------

def evaluate(model, reader, batch_size, cutoffs, tie_mode, topk, show_progress=False, on_output=None):
    """The one evaluation loop: ranks of every target against all items, and (when on_output
    wants them) each query's top-K."""
    model.begin_epoch(0, False, batch_size)
    metrics = RankMetrics(cutoffs)
    bar = progress_bar(show_progress, desc="evaluate", unit="targets")
    with bar:
        for batch in reader.batches(batch_size, training=False, known_items=model.known_items(),
                                    recommend=on_output is not None):
            out = model.eval_step(batch, topk, tie_mode)
            metrics.add(out.ranks)
            if on_output is not None:
                on_output(out)
            bar.update(len(out.ranks))
    return metrics.result()


def evaluate_phase(ctx, phase_name, model, cutoffs, tie_mode, topk, on_output=None):
    return evaluate(model, ctx.reader(phase_name), ctx.batch_size(phase_name), cutoffs, tie_mode, topk,
                    ctx.show_progress, on_output)


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
        def fill(f):
            f.write("session\titems\tscores\n")
            for q, ids, scores in self.sorted_rows():
                f.write(f"{q}\t{' '.join(self.names(ids))}\t{' '.join(f'{s:.6g}' for s in scores)}\n")
        write_atomic(path, fill)


def write_atomic(path, fill):
    from .checkpoint import SaveError

    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            fill(f)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        hint = "; free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise SaveError(f"cannot write {path}: {exc.strerror or exc}{hint}") from None


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


from .distributed import (check_cluster_train, check_local_cluster_train, run_cluster_train,  # noqa: E402
                          run_local_cluster_train)

RUNNER_CLASSES = {
    "train": run_train,
    "infer": run_infer,
    "serve": run_serve,
    "local_cluster_train": run_local_cluster_train,
    "cluster_train": run_cluster_train,
}

# runner class -> a check that prepare() runs before any runner starts
RUNNER_CHECKS = {
    "local_cluster_train": check_local_cluster_train,
    "cluster_train": check_cluster_train,
}
