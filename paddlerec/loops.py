"""The one train loop and the one evaluation loop, and the RunContext every runner works in.

Every runner class trains through `train_epoch` and evaluates through `evaluate`; they call
only what paddlerec/contract.py lists, so nothing here knows which model or reader runs.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Dict

import numpy as np

from .config import LEGACY_HINTS, Config
from .contract import DataInfo, EvalOutput
from .errors import ConfigError, PluginError, TrainingError, UserError
from .metrics import RankMetrics
from . import termination
from .params import validate_section
from .plugins import load_file, where
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
        return validate_section(source, module.HYPER_PARAMETERS, "hyper_parameters", LEGACY_HINTS)

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


@dataclass
class StopMode:
    """A runner returns this to end `mode` in this process (e.g. a cluster machine that does not
    hold the checkpoints: the machine that does runs the rest)."""

    reason: str


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


def build_model(ctx: RunContext, phase_name, hparams, data: DataInfo):
    module = ctx.model_module(phase_name)
    try:
        return module.Model(hparams, data)
    except UserError:
        raise
    except Exception as exc:
        raise PluginError(f"phase.{phase_name}.model: building the model failed at "
                          f"{where(exc, ctx.config.phases[phase_name]['model'])}: {type(exc).__name__}: {exc}") from exc


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
    model.begin_epoch(epoch, True)
    events = 0
    steps = 0
    loss_sum = 0.0  # sum of per-event losses
    started = time.perf_counter()
    bar = progress_bar(show_progress, total=total_events, desc=f"epoch {epoch}", unit="ev")
    with bar:
        for batch in batches:
            # summed row losses per mini-batch the batch holds: float [batch.n_steps]
            termination.check()
            losses = np.asarray(model.train_step(batch, batch_size), dtype=np.float64)
            step_events = np.asarray(batch.step_events, dtype=np.int64)  # int64 [batch.n_steps]
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
                loss_sum += float(losses[i])
                if steps % print_interval == 0:
                    elapsed = time.perf_counter() - started
                    log.info("epoch %d batch %d: loss %.5f, events %d, %.0f events/s", epoch, steps,
                             loss_sum / max(events, 1), events, events / max(elapsed, 1e-9))
            bar.update(int(step_events.sum()))
            bar.set_postfix_str(f"loss {loss_sum / max(events, 1):.4f}", refresh=False)
    seconds = time.perf_counter() - started
    return EpochResult(loss=loss_sum / max(events, 1), events=events, steps=steps, seconds=seconds)


# ---- evaluation ----------------------------------------------------------------------------

def evaluate(model, reader, batch_size, cutoffs, tie_mode, topk, show_progress=False, on_output=None, lists=None):
    """The one evaluation loop: ranks of every target against all items, and (when on_output
    wants them) each query's top-K. With `lists` (a metrics.ListMetrics), the reader also plays
    every target's click for its recommendations (query id -1 - session; see the reader's
    `target_lists`), which `lists` takes for Coverage@K / Popularity@K; on_output sees only the
    lists of ended queries either way."""
    model.begin_epoch(0, False)
    metrics = RankMetrics(cutoffs)
    extra = {"target_lists": True} if lists is not None else {}
    bar = progress_bar(show_progress, desc="evaluate", unit="targets")
    with bar:
        for batch in reader.batches(batch_size, training=False, known_items=model.known_items(),
                                    recommend=on_output is not None, **extra):
            termination.check()
            out = model.eval_step(batch, topk, tie_mode)
            metrics.add(out.ranks)
            if lists is not None:
                at_target = out.query_ids < 0  # [n_ended + n_targets]
                lists.add(out.topk_ids[at_target])
                ended = ~at_target
                out = EvalOutput(out.ranks, out.query_ids[ended], out.topk_ids[ended], out.topk_scores[ended])
            if on_output is not None:
                on_output(out)
            bar.update(len(out.ranks))
    result = metrics.result()
    if lists is not None:
        result.update(lists.result())
    return result


def evaluate_phase(ctx: RunContext, phase_name, model, cutoffs, tie_mode, topk, on_output=None, lists=None):
    return evaluate(model, ctx.reader(phase_name), ctx.batch_size(phase_name), cutoffs, tie_mode, topk,
                    ctx.show_progress, on_output, lists)
