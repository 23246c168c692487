"""Running `mode`: check everything that can be checked, then run each runner in order.

`prepare()` does all checking that needs more than the YAML (the registry's per-class checks,
the device, where the outputs go, init_model_path, the model and reader files, reading the
data) before any runner starts: a mistake costs seconds, never an epoch. `run()` then calls
each runner's run function, which paddlerec/registry.py names.
"""

import logging
import os
import time

from . import termination
from .errors import CheckpointError, ConfigError
from .files import temporary_name
from .loops import RunContext, StopMode, select_device
from .registry import RUNNER_CLASSES

log = logging.getLogger(__name__)

# runner keys naming a folder the runner writes into (checked before any runner starts)
OUTPUT_FOLDERS = ("save_checkpoint_path", "save_inference_path", "predictions_path", "metrics_path", "log_dir")


def prepare(ctx: RunContext):
    """Check everything that needs the model/reader files, before any work starts."""
    import paddle

    config = ctx.config
    for runner_name in config.mode:  # checks that need paddle itself (e.g. distributed strategies), before any data
        check = RUNNER_CLASSES[config.runners[runner_name]["class"]].check_function()
        if check is not None:
            check(ctx, runner_name)
    for runner_name in config.mode:
        check_output_folders(config, runner_name)
    for runner_name in config.mode:
        runner = config.runners[runner_name]
        runner_class = RUNNER_CLASSES[runner["class"]]
        if runner["device"] == "gpu" and not paddle.is_compiled_with_cuda():
            select_device(runner_name, "gpu")  # raises the explanatory error
        if not runner_class.has_phases:  # e.g. serve: checks its model when it starts (it may not exist yet)
            continue
        if runner.get("init_model_path"):
            check_init_path(config, runner_name)
        extra = [runner[key] for key in ("eval_phase", "train_phase") if runner.get(key)]
        for phase_name in runner["phases"] + extra:
            ctx.model_module(phase_name)
            if runner_class.trains:
                ctx.hyper_parameters(phase_name)
            ctx.reader(phase_name)


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


def check_output_folders(config, runner_name):
    """Every folder the runner writes into (checkpoints and curves, inference models, predictions,
    worker logs) must be a folder this process can write into, or creatable as one. Nothing is
    created here: a later mistake must leave no trace."""
    runner = config.runners[runner_name]
    for key in OUTPUT_FOLDERS:
        if key == "save_inference_path" and not runner.get("save_inference_interval"):
            continue
        if runner.get(key):
            problem = folder_problem(runner[key])
            if problem:
                raise ConfigError(f"runner.{runner_name}.{key}", problem)


def folder_problem(path):
    """Why `path` cannot be used as an output folder, or None when it can."""
    missing = []
    existing = path
    while not os.path.lexists(existing):  # the nearest ancestor that exists is where creating starts
        missing.append(existing)
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a symbolic link to {os.readlink(existing)}, which does not exist; fix or remove the link"
    if not os.path.isdir(existing):
        if existing == path:
            return f"{path} is a file, not a folder; remove it or name another folder"
        return f"{path} cannot be created: {existing} is a file, not a folder; name another folder"
    reason = _cannot_write_into(existing)
    if reason:
        what = f"{path} is" if existing == path else f"{path} cannot be created: {existing} is"
        return f"{what} not writable ({reason}); fix its permissions or name another folder"
    return None


def _cannot_write_into(folder):
    """None when a file can be created in `folder`, else the reason. Tried for real (a hidden empty
    file, removed at once): permission bits alone miss read-only mounts and ACLs, and root passes them."""
    probe = temporary_name(os.path.join(folder, "write-check"))
    try:
        with open(probe, "x"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        os.remove(probe)
    except OSError:
        pass
    return None


def run(ctx: RunContext):
    prepare(ctx)
    for runner_name in ctx.config.mode:
        runner = ctx.config.runners[runner_name]
        started = time.perf_counter()
        log.info("runner %s (%s) starts", runner_name, runner["class"])
        outcome = RUNNER_CLASSES[runner["class"]].run_function()(ctx, runner_name)
        termination.check()  # a SIGTERM its last steps swallowed (see termination.check)
        log.info("runner %s done in %.1fs", runner_name, time.perf_counter() - started)
        if isinstance(outcome, StopMode):
            log.info("%s", outcome.reason)
            break
