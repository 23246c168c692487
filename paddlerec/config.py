"""Load, override and validate the YAML config — once, before any work.

The result is a plain `Config` value that is passed to whoever needs it; nothing reads
settings from globals or environment variables. The model's `hyper_parameters` are
checked later, against the declaration in the model file (see `plugins.py`), because
only the model knows which keys it takes.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from . import yamlfile
from .errors import ConfigError
from .params import Param, check_value, unknown_key_error, validate_section
from .registry import RUNNER_CLASSES

TOP_LEVEL_KEYS = ("workspace", "dataset", "hyper_parameters", "mode", "runner", "phase")
LIST_SECTIONS = ("dataset", "runner", "phase")

DATASET_PARAMS = (
    Param("name", "str", help="name that phases refer to in `dataset_name`"),
    Param("batch_size", "int", min=1, max=100_000, help="sessions played in parallel (mini-batch rows)"),
    Param("type", "str", "DataLoader", choices=("DataLoader", "QueueDataset"),
          help="kept from PaddleRec 1.x; both read the files the same way, in this process"),
    Param("data_path", "path", help="a session file, or a folder of them (hidden files and sub-folders are skipped)"),
    Param("data_converter", "path", help="reader file that turns the files into batches"),
    Param("vocab_path", "path", "",
          help="vocab.txt from data/text2paddle.py (one original item id per line); empty: ids are used as they are"),
)

PHASE_PARAMS = (
    Param("name", "str", help="name that runners refer to in `phases`"),
    Param("model", "path", help="model file (see README, 'The model contract')"),
    Param("dataset_name", "str", help="the `dataset` entry this phase reads"),
    Param("thread_num", "int", 1, min=0, max=1024,
          help="CPU threads for computation (the largest over the run's phases is used); 0: every core this "
               "process may run on"),
)

def cpu_threads(thread_num: int) -> int:
    """A phase's thread_num as a thread count: 0 stands for every core this process may run on."""
    if thread_num > 0:
        return thread_num
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


# retired PaddleRec 1.x keys -> what to do instead
LEGACY_HINTS = {
    "vocab_size": "the number of items comes from the data (dataset `vocab_path`), not from the config",
    "hid_size": "use `layers: [100]`",
    "emb_lr_x": "per-matrix learning-rate multipliers are gone; set `optimizer.learning_rate`",
    "gru_lr_x": "per-matrix learning-rate multipliers are gone; set `optimizer.learning_rate`",
    "fc_lr_x": "per-matrix learning-rate multipliers are gone; set `optimizer.learning_rate`",
    "init_low_bound": "weights use Xavier-style uniform init; set `seed`",
    "init_high_bound": "weights use Xavier-style uniform init; set `seed`",
    "optimizer.strategy": "use a `local_cluster_train` runner for distributed training",
}


@dataclass
class Config:
    """A validated config. Paths are absolute; `{workspace}` is substituted."""

    path: str
    workspace: str
    datasets: Dict[str, dict]
    hyper_parameters: dict
    mode: List[str]
    runners: Dict[str, dict]
    phases: Dict[str, dict]
    overrides: List[str] = field(default_factory=list)

    def dataset_of(self, phase_name):
        return self.datasets[self.phases[phase_name]["dataset_name"]]


def resolve_config_path(path: str) -> str:
    """`-m` takes a YAML file or a folder holding config.yaml."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "config.yaml")
        if not os.path.isfile(candidate):
            raise ConfigError("-m", f"folder {path} holds no config.yaml; pass the YAML file itself")
        return os.path.abspath(candidate)
    if not os.path.isfile(path):
        raise ConfigError("-m", f"no such config file: {path}")
    return os.path.abspath(path)


def read_yaml(path: str) -> dict:
    """The config file's top-level mapping (see paddlerec/yamlfile.py for what is refused)."""
    try:
        raw = yamlfile.load_file(path)
    except yamlfile.YamlProblem as exc:
        where = f"{path}:{exc.line}" if exc.line is not None else path
        raise ConfigError("", f"{where}: {exc}") from None
    except OSError as exc:
        raise ConfigError("-m", f"cannot read {path}: {exc.strerror or exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: the config must be a mapping of keys (workspace, dataset, ...)")
    return raw


def apply_override(raw: dict, text: str) -> None:
    """Apply one `-o key=value`. List entries are addressed by their `name`."""
    if "=" not in text:
        raise ConfigError("-o", f"{text!r} is not KEY=VALUE")
    key, _, value_text = text.partition("=")
    key = key.strip()
    try:
        value = yamlfile.load_text(value_text) if value_text.strip() else ""
    except yamlfile.YamlProblem as exc:
        if "syntax error" not in str(exc):
            raise ConfigError(key, f"-o value {value_text!r}: {exc}") from None
        value = None
        if "{workspace}" not in value_text:
            raise ConfigError(key, f"-o value {value_text!r} is not valid YAML") from None
    if "{workspace}" in value_text and not isinstance(value, str):
        # unquoted, YAML reads "{workspace}/out" as a mapping; it can only mean the path
        value = value_text.strip()
    parts = [p for p in key.split(".")]
    if not key or any(not p for p in parts):
        raise ConfigError("-o", f"{text!r}: empty key")
    top = parts[0]
    if top not in TOP_LEVEL_KEYS:
        raise unknown_key_error(top, top, TOP_LEVEL_KEYS)
    if top in LIST_SECTIONS:
        if len(parts) < 3:
            raise ConfigError(key, f"address an entry by name: {top}.<name>.<key>=VALUE")
        entries = raw.get(top) or []
        names = [e.get("name") for e in entries if isinstance(e, dict)]
        matches = [e for e in entries if isinstance(e, dict) and e.get("name") == parts[1]]
        if not matches:
            raise ConfigError(f"{top}.{parts[1]}", f"no {top} entry named {parts[1]!r}; names: {', '.join(map(str, names))}")
        target, rest = matches[0], parts[2:]
    else:
        target, rest = raw, parts
    for part in rest[:-1]:
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key, f"{part!r} holds a value, not a mapping")
        target = child
    target[rest[-1]] = value


def substitute_workspace(value, workspace: str):
    if isinstance(value, str):
        return value.replace("{workspace}", workspace)
    if isinstance(value, list):
        return [substitute_workspace(v, workspace) for v in value]
    if isinstance(value, dict):
        return {k: substitute_workspace(v, workspace) for k, v in value.items()}
    return value


def _entries(raw: dict, section: str) -> List[dict]:
    entries = raw.get(section)
    if entries is None:
        raise ConfigError(section, "missing; see README for the shape of the config")
    if not isinstance(entries, list):
        raise ConfigError(section, f"expected a list of entries (- name: ...), got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{section}[{i}]", "expected a mapping with a name")
        if not isinstance(entry.get("name"), str) or not entry.get("name"):
            raise ConfigError(f"{section}[{i}].name", "missing; every entry needs a name")
    names = [e["name"] for e in entries]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{section}.{name}", "the name is used by more than one entry")
    return entries


def _resolve_paths(entry: dict, params: Sequence[Param], base: str) -> dict:
    out = dict(entry)
    for param in params:
        value = out.get(param.name)
        if param.type == "path" and isinstance(value, str) and value:
            out[param.name] = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    return out


def load_config(path: str, overrides: Sequence[str] = (), check_files: bool = True) -> Config:
    """Read, override, substitute and validate a config. Raises ConfigError.

    check_files=False skips the existence checks of the files the run will read (for tools
    that create the data first)."""
    config_path = resolve_config_path(path)
    raw = read_yaml(config_path)
    for text in overrides:
        apply_override(raw, text)

    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_key_error(str(key), str(key), TOP_LEVEL_KEYS)

    workspace = raw.get("workspace", ".")
    workspace = check_value(Param("workspace", "str"), workspace, "workspace")
    workspace = os.path.normpath(os.path.join(os.path.dirname(config_path), os.path.expanduser(workspace)))
    raw = {k: (substitute_workspace(v, workspace) if k != "workspace" else v) for k, v in raw.items()}

    datasets = {}
    for entry in _entries(raw, "dataset"):
        values = validate_section(entry, DATASET_PARAMS, f"dataset.{entry['name']}")
        datasets[entry["name"]] = _resolve_paths(values, DATASET_PARAMS, workspace)

    phases = {}
    for entry in _entries(raw, "phase"):
        values = validate_section(entry, PHASE_PARAMS, f"phase.{entry['name']}")
        phases[entry["name"]] = _resolve_paths(values, PHASE_PARAMS, workspace)

    runners = {}
    for entry in _entries(raw, "runner"):
        prefix = f"runner.{entry['name']}"
        cls = entry.get("class")
        if cls is None:
            raise ConfigError(f"{prefix}.class", f"missing; one of: {', '.join(RUNNER_CLASSES)}")
        if not isinstance(cls, str) or cls not in RUNNER_CLASSES:
            raise ConfigError(f"{prefix}.class", f"{cls!r} is not one of: {', '.join(RUNNER_CLASSES)}")
        params = RUNNER_CLASSES[cls].params
        values = validate_section(entry, params, prefix)
        runners[entry["name"]] = _resolve_paths(values, params, workspace)

    if "mode" not in raw:
        raise ConfigError("mode", f"missing; name the runner(s) to run, from: {', '.join(runners)}")
    mode = check_value(Param("mode", "names"), raw["mode"], "mode")
    if not mode:
        raise ConfigError("mode", f"empty; name the runner(s) to run, from: {', '.join(runners)}")
    for name in mode:
        if name not in runners:
            raise ConfigError("mode", f"no runner named {name!r}; runners: {', '.join(runners)}")

    hyper_parameters = raw.get("hyper_parameters") or {}
    if not isinstance(hyper_parameters, dict):
        raise ConfigError("hyper_parameters", "expected a mapping of keys")

    config = Config(config_path, workspace, datasets, hyper_parameters, mode, runners, phases, list(overrides))
    _check_references(config, check_files)
    return config


def _check_references(config: Config, check_files: bool = True) -> None:
    for name, phase in config.phases.items():
        if phase["dataset_name"] not in config.datasets:
            raise ConfigError(f"phase.{name}.dataset_name",
                              f"no dataset named {phase['dataset_name']!r}; datasets: {', '.join(config.datasets)}")
    for name, runner in config.runners.items():
        prefix = f"runner.{name}"
        # checked here, not when the first export is due: an epoch of training must not be lost to it
        if runner.get("save_inference_interval") and not runner.get("save_inference_path"):
            raise ConfigError(f"{prefix}.save_inference_path",
                              f"missing; save_inference_interval is {runner['save_inference_interval']}, so name a "
                              f"folder for the inference models (or set save_inference_interval: 0)")
        runner_class = RUNNER_CLASSES[runner["class"]]
        if not runner_class.has_phases:  # e.g. a serve runner: checked when it starts (the model may not exist yet)
            continue
        for phase in runner["phases"]:
            if phase not in config.phases:
                raise ConfigError(f"{prefix}.phases", f"no phase named {phase!r}; phases: {', '.join(config.phases)}")
        if not runner["phases"]:
            raise ConfigError(f"{prefix}.phases", f"empty; name a phase from: {', '.join(config.phases)}")
        if runner_class.trains and len(runner["phases"]) != 1:
            raise ConfigError(f"{prefix}.phases", f"a {runner['class']} runner trains exactly one phase, got {runner['phases']}")
        for key in ("eval_phase", "train_phase"):
            other = runner.get(key)
            if other and other not in config.phases:
                raise ConfigError(f"{prefix}.{key}", f"no phase named {other!r}; phases: {', '.join(config.phases)}")

    # Files only matter for what this run will use.
    if not check_files:
        return
    for phase_name in used_phases(config):
        phase = config.phases[phase_name]
        if not os.path.isfile(phase["model"]):
            raise ConfigError(f"phase.{phase_name}.model", f"model file not found: {phase['model']}")
        dataset_name = phase["dataset_name"]
        dataset = config.datasets[dataset_name]
        prefix = f"dataset.{dataset_name}"
        if not os.path.isfile(dataset["data_converter"]):
            raise ConfigError(f"{prefix}.data_converter", f"reader file not found: {dataset['data_converter']}")
        if not os.path.exists(dataset["data_path"]):
            raise ConfigError(f"{prefix}.data_path",
                              f"no such file or folder: {dataset['data_path']} (run `sh data_prepare.sh` or fix the path)")
        if dataset["vocab_path"] and not os.path.isfile(dataset["vocab_path"]):
            raise ConfigError(f"{prefix}.vocab_path",
                              f"no such file: {dataset['vocab_path']} (data/text2paddle.py writes it)")


def used_phases(config: Config) -> List[str]:
    """Phases the runners in `mode` will run (including per-epoch evaluation phases), in order."""
    names = []
    for runner_name in config.mode:
        runner = config.runners[runner_name]
        extra = [runner[key] for key in ("eval_phase", "train_phase") if runner.get(key)]
        for phase in list(runner.get("phases", [])) + extra:
            if phase not in names:
                names.append(phase)
    return names
