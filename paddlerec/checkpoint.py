"""Training checkpoints on disk, written so that a kill never leaves a broken one.

Layout: `<root>/<epoch>/` holds
    model.pdparams   the network's state_dict (paddle.save)
    optimizer.pdopt  the optimizer's state (named tensors)
    meta.json        epoch, data info, model signature, hyper_parameters — written last
(Inference models have their own layout: paddlerec/export.py.)

Everything is written into a hidden temporary folder next to the target and renamed into
place only when complete (paddlerec/files.atomic_folder); a folder without meta.json is never
picked up.
"""

import json
import logging
import os
import time

import paddle

from .errors import CheckpointError
from .files import atomic_folder, save_error, write_json

log = logging.getLogger(__name__)

FORMAT = 1
META = "meta.json"


def save_checkpoint(root, epoch, model, meta):
    """Write checkpoint `<root>/<epoch>`; meta (JSON-able) gets epoch and signature added.
    Raises SaveError (e.g. a full disk); the checkpoints saved before are untouched then."""
    def fill(tmp):
        paddle.save(model.network.state_dict(), os.path.join(tmp, "model.pdparams"))
        paddle.save(model.optimizer_state(), os.path.join(tmp, "optimizer.pdopt"))
        write_json(os.path.join(tmp, META), dict(meta, format=FORMAT, epoch=epoch, signature=model.signature(),
                                                 saved_at=time.strftime("%Y-%m-%dT%H:%M:%S")))
    try:
        return atomic_folder(root, str(epoch), fill)
    except OSError as exc:
        raise save_error(os.path.join(root, str(epoch)), exc, ". Earlier checkpoints are untouched.") from None


def is_checkpoint(path):
    return os.path.isfile(os.path.join(path, META))


def list_checkpoints(root):
    """Complete checkpoints under root, oldest epoch first: [(epoch, path)]."""
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.isdigit() and is_checkpoint(path):
                found.append((int(name), path))
    return sorted(found)


def run_of(path):
    """(run id, time its meta.json was written) of a checkpoint; unreadable ones sort first."""
    try:
        with open(os.path.join(path, META), encoding="utf-8") as f:
            run_id = json.load(f).get("run_id", "")
        return run_id, os.path.getmtime(os.path.join(path, META))
    except (OSError, ValueError):
        return "", 0.0


def resolve(path, key, all_of_them=False):
    """A checkpoint folder, or its parent: the newest checkpoint (or every one, when all_of_them)
    of the training run that saved last there. Checkpoints an earlier run left in the same
    folder are skipped, and said so: mixing two runs' epochs would mislead."""
    if not os.path.exists(path):
        raise CheckpointError(f"{key}: {path} does not exist; train first (a train runner with "
                              f"save_checkpoint_path) or point it at a checkpoint")
    if is_checkpoint(path):
        return [path]
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{key}: {path} holds no complete checkpoint (a folder <epoch>/ with {META})")
    runs = {p: run_of(p) for _, p in found}
    latest_run = max(runs.values(), key=lambda r: r[1])[0]
    current = [(e, p) for e, p in found if runs[p][0] == latest_run]
    stale = [e for e, p in found if runs[p][0] != latest_run]
    if stale:
        log.warning("%s: skipping checkpoint(s) %s left there by an earlier training run; using the latest run's "
                    "epochs %s", path, ", ".join(map(str, stale)), ", ".join(str(e) for e, _ in current))
    return [p for _, p in current] if all_of_them else [current[-1][1]]


def read_meta(path):
    try:
        with open(os.path.join(path, META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable {META} ({exc}); the checkpoint is damaged") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    return meta


def check_signature(meta, model, path):
    """The checkpoint must have been made by a model of the same shape."""
    saved, current = meta.get("signature", {}), model.signature()
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k) and k != "parameters"]
    if not diffs and saved.get("parameters") != current.get("parameters"):
        diffs.append("parameter shapes differ")
    if diffs:
        raise CheckpointError(f"{path} was trained with another model shape ({'; '.join(diffs)}); "
                              f"use a checkpoint of this model or change the config to match it")


def load_into(model, path, with_optimizer=True):
    try:
        state = paddle.load(os.path.join(path, "model.pdparams"))
        model.network.set_state_dict(state)
        if with_optimizer:
            model.load_optimizer_state(paddle.load(os.path.join(path, "optimizer.pdopt")))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {exc}); the checkpoint is damaged "
                              f"or from another model") from None
