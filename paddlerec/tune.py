"""Hyper-parameter search: the `tune` runner class (Optuna, an optional dependency).

A tune runner trains its phase once per trial with settings drawn from a search space (a YAML
of ranges and choices, like the official GRU4Rec paramspaces), evaluates each trial on its
`eval_phase` (e.g. train_tr -> train_valid) and keeps the trials in an SQLite study, so a
search that was killed continues where it stopped. Every trial prints one JSON line on stdout;
the best trial is written as a ready config (the run's config with the best settings).

Trials train through the one train loop and evaluate through the one evaluation loop
(paddlerec/loops.py), with nothing specific to a model: a search-space key is either
`batch_size` (the training phase's dataset) or a key of the model's hyper_parameters.
"""

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .config import DATASET_PARAMS, apply_override, read_yaml
from .errors import ConfigError, TrainingError, UserError
from .files import atomic_files
from .loops import build_model, evaluate, select_device, train_epoch
from .params import Param, check_value, unknown_key_error
from .progress import progress_bar
from .registry import RUNNER_CLASSES

log = logging.getLogger(__name__)

INSTALL_HINT = ".venv/bin/python -m pip install -r requirements-tune.txt"
DIMENSION_TYPES = ("int", "float", "categorical")
DIMENSION_KEYS = {"int": ("type", "low", "high", "step", "log"),
                  "float": ("type", "low", "high", "step", "log"),
                  "categorical": ("type", "choices")}
DATASET_KEYS = ("batch_size",)  # dataset keys a search space may tune (those of the training phase's dataset)
# set on a trial when its result is told: a trial a killed run left RUNNING lacks it, is closed as
# failed on resume (not counted) and runs again
COUNTED = "counted"


class MissingDependency(UserError):
    """An optional library a feature needs is not installed."""

    exit_code = 2
    prefix = "error"


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise MissingDependency(f"the tune runner needs Optuna, which is not installed; install it with: "
                                f"{INSTALL_HINT}") from None
    return optuna


# ---- the search space ----------------------------------------------------------------------

@dataclass(frozen=True)
class Dimension:
    """One tuned key: a range of ints or floats (optionally stepped or log-scaled) or a list of choices."""

    name: str
    type: str
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        if self.type == "float":
            value = trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
            return float(f"{value:.10g}")  # low + k * step carries binary noise (0.15000000000000002)
        # Optuna stores choices as plain values: a list choice (e.g. layers [100, 100]) goes by index
        index = trial.suggest_categorical(self.name, list(range(len(self.choices))))
        return self.choices[index]

    def describe(self):
        """A plain-data description (kept with the study, to refuse resuming it with another space)."""
        if self.type == "categorical":
            return {"name": self.name, "type": self.type, "choices": list(self.choices)}
        return {"name": self.name, "type": self.type, "low": self.low, "high": self.high, "step": self.step,
                "log": self.log}


def tunable_params(model_params: Sequence[Param]) -> Dict[str, Param]:
    """Search-space key -> the Param a value of it must satisfy."""
    params = {p.name: p for p in DATASET_PARAMS if p.name in DATASET_KEYS}
    params.update({p.name: p for p in model_params})
    return params


def _value_for(param: Param, value):
    """`value` as the config key takes it: an int for a list-of-int key (layers: 128) is one layer."""
    if param.type.startswith("list[") and not isinstance(value, list):
        return [value]
    return value


def read_search_space(path: str, model_params: Sequence[Param], key: str) -> List[Dimension]:
    """Parse and check a search-space YAML; every problem is a ConfigError naming `key`, the file and the entry."""
    if not os.path.isfile(path):
        raise ConfigError(key, f"no such file: {path} (see configs/tune_space_xe.yaml for the format)")
    raw = read_yaml(path)
    where = f"{key}: {path}"
    if not raw:
        raise ConfigError("", f"{where}: the search space is empty; name at least one key to tune")
    targets = tunable_params(model_params)
    dimensions = []
    for name, entry in raw.items():
        name = str(name)
        at = f"{where}: {name}"
        if name not in targets:
            raise unknown_key_error(at, name, list(targets), "a search space tunes `batch_size` or a "
                                                              "hyper_parameters key")
        if not isinstance(entry, dict):
            raise ConfigError("", f"{at}: expected a mapping like {{type: float, low: 0.0, high: 0.5}}, got {entry!r}")
        kind = entry.get("type")
        if kind not in DIMENSION_TYPES:
            raise ConfigError("", f"{at}.type: {kind!r} is not one of: {', '.join(DIMENSION_TYPES)}")
        for field_name in entry:
            if field_name not in DIMENSION_KEYS[kind]:
                raise unknown_key_error(f"{at}.{field_name}", str(field_name), DIMENSION_KEYS[kind],
                                        f"a {kind} entry takes these")
        param = targets[name]
        if kind == "categorical":
            dimensions.append(_categorical(entry, param, at))
        else:
            dimensions.append(_range(name, kind, entry, param, at))
    return dimensions


def _categorical(entry, param, at):
    choices = entry.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError("", f"{at}.choices: expected a non-empty list of values, got {choices!r}")
    for i, choice in enumerate(choices):
        check_value(param, _value_for(param, choice), f"{at}.choices[{i}]")
    return Dimension(param.name, "categorical", choices=tuple(choices))


def _range(name, kind, entry, param, at):
    element = param.type[5:-1] if param.type.startswith("list[") else param.type
    if element != kind and not (element == "float" and kind == "int"):
        raise ConfigError("", f"{at}.type: {name} takes {element} values, so its range must be of type {element} "
                              f"(or categorical)")
    values = {}
    for bound in ("low", "high"):
        if bound not in entry:
            raise ConfigError("", f"{at}.{bound}: missing; a {kind} range needs low and high")
        value = entry[bound]
        if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError("", f"{at}.{bound}: expected an int, got {value!r}")
        if kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ConfigError("", f"{at}.{bound}: expected a number, got {value!r}")
        check_value(param, _value_for(param, value), f"{at}.{bound}")
        values[bound] = float(value) if kind == "float" else value
    if values["low"] > values["high"]:
        raise ConfigError("", f"{at}: low ({values['low']}) is above high ({values['high']})")
    step, use_log = entry.get("step"), entry.get("log", False)
    if not isinstance(use_log, bool):
        raise ConfigError("", f"{at}.log: expected true or false, got {use_log!r}")
    if step is not None:
        number = isinstance(step, int) if kind == "int" else isinstance(step, (int, float))
        if isinstance(step, bool) or not number or step <= 0:
            raise ConfigError("", f"{at}.step: expected a positive {'int' if kind == 'int' else 'number'}, "
                                  f"got {step!r}")
        if use_log and step != 1:
            raise ConfigError("", f"{at}: log and step exclude each other (a log scale has no fixed step)")
        step = float(step) if kind == "float" else step
    if use_log and values["low"] <= 0:
        raise ConfigError("", f"{at}: a log range needs low > 0, got {values['low']}")
    return Dimension(name, kind, values["low"], values["high"], None if use_log and kind == "float" else step, use_log)


def split_values(values: Dict[str, Any], model_params: Sequence[Param]):
    """A trial's {key: value} -> (hyper_parameters overrides as nested-key values, batch_size or None)."""
    targets = tunable_params(model_params)
    hyper = {name: _value_for(targets[name], v) for name, v in values.items() if name not in DATASET_KEYS}
    return hyper, values.get("batch_size")


def with_values(hyper_parameters: dict, dotted: Dict[str, Any]) -> dict:
    """A copy of a (nested) hyper_parameters mapping with dotted keys set."""
    out = json.loads(json.dumps(hyper_parameters))  # a deep copy of plain YAML data
    for name, value in dotted.items():
        target = out
        parts = name.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return out


# ---- checks before any work ------------------------------------------------------------------

def best_mode(config, runner_name) -> List[str]:
    """`mode` of the config the runner writes: its best_mode, else the config file's mode without tune runners."""
    runner = config.runners[runner_name]
    if runner["best_mode"]:
        return list(runner["best_mode"])
    raw = read_yaml(config.path)
    mode = raw.get("mode") or []
    mode = [mode] if isinstance(mode, str) else list(mode)
    return [name for name in mode if name in config.runners and config.runners[name]["class"] != "tune"]


def check_tune(ctx, runner_name):
    """Run before any runner starts: Optuna present, the search space valid, the written config's mode sound."""
    import_optuna()
    config = ctx.config
    runner = config.runners[runner_name]
    prefix = f"runner.{runner_name}"
    if not runner["eval_phase"]:
        raise ConfigError(f"{prefix}.eval_phase", "missing; name the validation phase each trial is evaluated on")
    read_search_space(runner["search_space"], ctx.model_module(runner["phases"][0]).HYPER_PARAMETERS,
                      f"{prefix}.search_space")
    mode = best_mode(config, runner_name)
    for name in runner["best_mode"]:
        if name not in config.runners:
            raise ConfigError(f"{prefix}.best_mode", f"no runner named {name!r}; runners: {', '.join(config.runners)}")
        if config.runners[name]["class"] == "tune":
            raise ConfigError(f"{prefix}.best_mode", f"{name} is a tune runner; name the runners that train and "
                                                     f"evaluate with the best settings")
    if not mode:
        raise ConfigError(f"{prefix}.best_mode", "empty, and the config's own mode has no other runner; name the "
                                                 "runners the written config runs (e.g. [cpu_train_runner, "
                                                 "cpu_infer_runner])")


# ---- the study -------------------------------------------------------------------------------

def objective_name(runner):
    return f"{runner['metric']}@{runner['cutoff']}"


def open_study(optuna, config, runner_name, space: List[Dimension]):
    """Create the study, or load it and close the trials a killed run left open (they are run again)."""
    runner = config.runners[runner_name]
    path = runner["study_path"]
    name = runner["study_name"] or runner_name
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fingerprint = {"space": [d.describe() for d in space], "objective": objective_name(runner),
                   "tie_mode": runner["tie_mode"], "epochs": runner["epochs"], "phase": runner["phases"][0],
                   "eval_phase": runner["eval_phase"]}
    try:
        study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize",
                                    load_if_exists=True)
    except Exception as exc:  # sqlalchemy/optuna errors: not a database, locked, another direction, ...
        raise ConfigError(f"runner.{runner_name}.study_path",
                          f"cannot open the study {name!r} in {path}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}; pass another study_name or file") from None
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", fingerprint)
    elif stored != fingerprint:
        changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
        raise ConfigError(f"runner.{runner_name}.study_path",
                          f"the study {name!r} in {path} was run with another {', '.join(changed)}; resume it with "
                          f"the same settings, or pass another study_name (or delete the file) to start anew")
    states = optuna.trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        # one process per study: a trial still RUNNING was cut off by a kill; close it and run it again
        study.tell(trial.number, state=states.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        log.info("trial %d was interrupted; it runs again", trial.number)
    return study


def finished_trials(optuna, study):
    states = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.FAIL, states.PRUNED))
            if t.user_attrs.get(COUNTED)]


# ---- one trial -------------------------------------------------------------------------------

def run_trial(ctx, runner_name, number, values, model_params) -> Tuple[dict, float]:
    """Train the phase `epochs` epochs with `values` and evaluate on eval_phase after each; returns
    (metrics after the last epoch, mean training loss of the last epoch)."""
    runner = ctx.config.runners[runner_name]
    phase, valid = runner["phases"][0], runner["eval_phase"]
    hyper, batch_size = split_values(values, model_params)
    hparams = ctx.hyper_parameters(phase, with_values(ctx.config.hyper_parameters, hyper))
    batch_size = batch_size or ctx.batch_size(phase)
    reader = ctx.reader(phase)
    model = build_model(ctx, phase, hparams, reader.info())
    cutoff = runner["cutoff"]
    metrics, loss = {}, float("nan")
    for epoch in range(1, runner["epochs"] + 1):
        # log lines per trial epoch only (below); the loop's per-batch lines would drown them
        result = train_epoch(model, reader.batches(batch_size, training=True), batch_size, epoch,
                             print_interval=2 ** 62, show_progress=False)
        metrics = evaluate(model, ctx.reader(valid), ctx.batch_size(valid), (cutoff,), runner["tie_mode"], cutoff)
        loss = result.loss
        log.info("trial %d epoch %d: loss %.5f, %.0f events/s, %s on %s: %.4f", number, epoch, result.loss,
                 result.events_per_s, objective_name(runner), valid, metrics[objective_name(runner)])
    del model
    gc.collect()
    return metrics, loss


# ---- the ready config ------------------------------------------------------------------------

def write_best_config(config, runner_name, trial_number, values, value, model_params) -> str:
    """The config file (with the run's -o overrides, except mode) with the best trial's settings and
    the `mode` of best_mode, written to best_config_path; returns the path."""
    from .config import load_config

    runner = config.runners[runner_name]
    path = runner["best_config_path"]
    raw = read_yaml(config.path)
    for text in config.overrides:
        if text.partition("=")[0].strip() != "mode":
            apply_override(raw, text)
    if not os.path.isabs(os.path.expanduser(str(raw.get("workspace", ".")))):  # relative to the config's folder
        raw["workspace"] = os.path.relpath(config.workspace, os.path.dirname(path))
    hyper, batch_size = split_values(values, model_params)
    raw["hyper_parameters"] = with_values(raw.get("hyper_parameters") or {}, hyper)
    if batch_size is not None:  # every dataset a training runner reads takes the tuned batch size
        trained = {config.phases[p]["dataset_name"] for r in config.runners.values()
                   if RUNNER_CLASSES[r["class"]].trains for p in r.get("phases", [])}
        for entry in raw.get("dataset") or []:
            if isinstance(entry, dict) and entry.get("name") in trained:
                entry["batch_size"] = batch_size
    raw["mode"] = best_mode(config, runner_name)
    tuned = ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
    header = (f"# Written by the tune runner {runner_name} of {os.path.basename(config.path)}: trial {trial_number}, "
              f"{objective_name(runner)} {value:.4f} on {runner['eval_phase']} after {runner['epochs']} epoch(s).\n"
              f"# Tuned: {tuned}\n"
              f"# Run it: python -m paddlerec.run -m {_shown(path)}\n")
    with atomic_files(path) as (stream,):
        stream.write(header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, allow_unicode=True))
    load_config(path, check_files=False)  # what we wrote must load; a failure here is a bug, not user input
    return path


def _shown(path):
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative



# ---- the runner ------------------------------------------------------------------------------

def run_tune(ctx, runner_name):
    optuna = import_optuna()
    # Optuna logs every trial itself; this runner prints its own line per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = ctx.config
    runner = config.runners[runner_name]
    select_device(runner_name, runner["device"])
    phase = runner["phases"][0]
    model_params = ctx.model_module(phase).HYPER_PARAMETERS
    space = read_search_space(runner["search_space"], model_params, f"runner.{runner_name}.search_space")
    study = open_study(optuna, config, runner_name, space)
    done = len(finished_trials(optuna, study))
    # a resumed search draws anew: seeding with the trials so far keeps it from repeating the first draws
    study.sampler = optuna.samplers.TPESampler(seed=runner["seed"] + len(study.trials))
    objective = objective_name(runner)
    if done >= runner["n_trials"]:
        log.info("study %s (%s) holds %d finished trials (n_trials %d): none left to run", study.study_name,
                 runner["study_path"], done, runner["n_trials"])
    elif done:
        log.info("study %s (%s): %d of %d trials done; resuming", study.study_name, runner["study_path"], done,
                 runner["n_trials"])
    bar = progress_bar(ctx.show_progress, total=runner["n_trials"], desc="tune", unit="trial")
    with bar:
        bar.update(done)
        for _ in range(max(runner["n_trials"] - done, 0)):
            trial = study.ask()
            values = {d.name: d.suggest(trial) for d in space}
            started = time.perf_counter()
            row = {"event": "trial", "trial": trial.number, "params": values}
            try:
                metrics, loss = run_trial(ctx, runner_name, trial.number, values, model_params)
            except TrainingError as exc:  # diverged (NaN loss): a failed trial, the search goes on
                trial.set_user_attr(COUNTED, True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                row.update(state="fail", error=str(exc))
                log.warning("trial %d failed: %s", trial.number, exc)
            else:
                trial.set_user_attr(COUNTED, True)
                study.tell(trial, metrics[objective])
                row.update(state="complete", objective=objective, value=metrics[objective], loss=loss,
                           **{k: v for k, v in metrics.items() if k != "targets"}, targets=metrics["targets"])
            row["seconds"] = round(time.perf_counter() - started, 3)
            print(json.dumps(row), flush=True)
            ctx.record(runner_name, "trials", row)
            bar.update(1)
            best = _best(optuna, study)
            if best is not None:
                bar.set_postfix_str(f"best {objective} {best.value:.4f} (trial {best.number})")
    best = _best(optuna, study)
    if best is None:
        raise TrainingError(f"runner.{runner_name}: no trial of the study completed (every one diverged); narrow "
                            f"the search space (e.g. lower optimizer.learning_rate's high) and use another study_name")
    values = {d.name: _stored_value(d, best.params[d.name]) for d in space}
    path = write_best_config(config, runner_name, best.number, values, best.value, model_params)
    summary = {"event": "best", "trial": best.number, "objective": objective, "value": best.value, "params": values,
               "config": path}
    print(json.dumps(summary), flush=True)
    ctx.record(runner_name, "best", summary)
    log.info("best trial %d: %s %.4f; its config: %s", best.number, objective, best.value, path)


def _best(optuna, study) -> Optional[object]:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _stored_value(dimension: Dimension, stored):
    """The value a trial used, from what Optuna stored (a choice's index; a float before rounding)."""
    if dimension.type == "categorical":
        return dimension.choices[stored]
    if dimension.type == "float":
        return float(f"{stored:.10g}")
    return stored
