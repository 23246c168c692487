"""Training checkpoints on disk, written so that a kill never leaves a broken one.

Layout: `<root>/<epoch>/` holds
    model.pdparams   the network's state_dict (paddle.save)
    optimizer.pdopt  the optimizer's state (named tensors)
    meta.json        epoch, data info, model signature, hyper_parameters, and (format 2) the size
                     and sha256 of both files and the name, shape and dtype of every weight
                     tensor — written last
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
from .files import atomic_folder, file_digest, save_error, write_json

log = logging.getLogger(__name__)

FORMAT = 2  # 2: meta.json lists the files' sizes and sha256 and the weight tensors
READABLE_FORMATS = (1, 2)  # 1: no checksums, so only the tensors are checked
META = "meta.json"
WEIGHTS = "model.pdparams"
OPTIMIZER = "optimizer.pdopt"


def save_checkpoint(root, epoch, model, meta):
    """Write checkpoint `<root>/<epoch>`; meta (JSON-able) gets epoch and signature added.
    Raises SaveError (e.g. a full disk); the checkpoints saved before are untouched then."""
    def fill(tmp):
        state = model.network.state_dict()
        paddle.save(state, os.path.join(tmp, WEIGHTS))
        paddle.save(model.optimizer_state(), os.path.join(tmp, OPTIMIZER))
        digests = {name: file_digest(os.path.join(tmp, name)) for name in (WEIGHTS, OPTIMIZER)}
        write_json(os.path.join(tmp, META), dict(meta, format=FORMAT, epoch=epoch, signature=model.signature(),
                                                 files=digests, tensors=describe_tensors(state),
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
            meta = json.load(f)
        run_id = meta.get("run_id", "") if isinstance(meta, dict) else ""
        return str(run_id), os.path.getmtime(os.path.join(path, META))
    except (OSError, ValueError):
        return "", 0.0


def resolve(path, key, all_of_them=False):
    """A checkpoint folder, or its parent: the newest checkpoint (or every one, when all_of_them)
    of the training run that saved last there. Checkpoints an earlier run left in the same
    folder are skipped, and said so: mixing two runs' epochs would mislead.

    Every checkpoint returned has a sound meta.json and weights file (size and sha256), so that a
    damaged one stops the run before any work, not after the others were evaluated."""
    if not os.path.exists(path):
        raise CheckpointError(f"{key}: {path} does not exist; train first (a train runner with "
                              f"save_checkpoint_path) or point it at a checkpoint")
    if is_checkpoint(path):
        chosen = [path]
    else:
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{key}: {path} holds no complete checkpoint (a folder <epoch>/ with {META})")
        for _, p in found:
            read_meta(p)  # a damaged meta.json is said so, not taken for another run's
        runs = {p: run_of(p) for _, p in found}
        latest_run = max(runs.values(), key=lambda r: r[1])[0]
        current = [(e, p) for e, p in found if runs[p][0] == latest_run]
        stale = [e for e, p in found if runs[p][0] != latest_run]
        if stale:
            log.warning("%s: skipping checkpoint(s) %s left there by an earlier training run; using the latest "
                        "run's epochs %s", path, ", ".join(map(str, stale)), ", ".join(str(e) for e, _ in current))
        chosen = [p for _, p in current] if all_of_them else [current[-1][1]]
    for p in chosen:
        verify_file(p, WEIGHTS, read_meta(p, keys=()))
    return chosen


DAMAGED = "the checkpoint is damaged; use another one (or train again)"


def describe_tensors(state):
    """{name: {"shape": [...], "dtype": "float32"}} of a state_dict (what meta.json records)."""
    return {name: {"shape": [int(d) for d in tensor.shape], "dtype": _dtype_name(tensor.dtype)}
            for name, tensor in state.items()}


def _dtype_name(dtype):
    return str(dtype).replace("paddle.", "")


def _is_count(value, least=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# what the runners read from meta.json, beyond what loading the files needs
RUN_KEYS = ("epoch", "signature", "hyper_parameters", "data")


def read_meta(path, keys=RUN_KEYS):
    """meta.json of checkpoint `path`, with `keys` (and, from format 2 on, the files' checksums and
    the tensors) checked; CheckpointError else."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        what = "is a folder, not a file" if os.path.isdir(meta_path) else "is missing"
        raise CheckpointError(f"{meta_path} {what}; {DAMAGED}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            text = f.read()
        meta = json.loads(text) if text.strip() else None
    except OSError as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc.strerror or exc}); {DAMAGED}") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{meta_path}: not valid JSON; {DAMAGED}") from None
    if not text.strip():
        raise CheckpointError(f"{meta_path} is empty (0 bytes); {DAMAGED}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} holds {json.dumps(meta)[:40]}, not the checkpoint's description; {DAMAGED}")
    fmt = meta.get("format")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not one this version reads "
                              f"({', '.join(map(str, READABLE_FORMATS))}); train again with this version")
    problems = []
    if "epoch" in keys and not _is_count(meta.get("epoch")):
        problems.append("epoch")
    for key in [k for k in keys if k != "epoch"] + (["files", "tensors"] if fmt >= 2 else []):
        if not isinstance(meta.get(key), dict):
            problems.append(key)
    if "data" in keys and isinstance(meta.get("data"), dict) and not _is_count(meta["data"].get("n_items"), 1):
        problems.append("data.n_items")
    if isinstance(meta.get("files"), dict):
        for name in (WEIGHTS, OPTIMIZER):
            entry = meta["files"].get(name)
            if not (isinstance(entry, dict) and _is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)):
                problems.append(f"files.{name}")
    if problems:
        raise CheckpointError(f"{meta_path}: missing or malformed {', '.join(problems)}; {DAMAGED}")
    return meta


def verify_file(path, name, meta):
    """`path/name` must be a non-empty regular file with the size and sha256 meta.json recorded."""
    full = os.path.join(path, name)
    if os.path.isdir(full):
        raise CheckpointError(f"{full} is a folder, not a file; {DAMAGED}")
    if not os.path.isfile(full):
        raise CheckpointError(f"{full} is missing; {DAMAGED}")
    try:
        found = file_digest(full)
    except OSError as exc:
        raise CheckpointError(f"{full}: unreadable ({exc.strerror or exc}); {DAMAGED}") from None
    if found["bytes"] == 0:
        raise CheckpointError(f"{full} is empty (0 bytes); {DAMAGED}")
    expected = meta.get("files", {}).get(name)
    if expected is None:  # format 1: nothing recorded
        return
    if found["bytes"] != expected["bytes"]:
        raise CheckpointError(f"{full}: {found['bytes']} bytes, but {expected['bytes']} were saved; {DAMAGED}")
    if found["sha256"] != expected["sha256"]:
        raise CheckpointError(f"{full}: its sha256 differs from the one saved with it (the file was changed or "
                              f"damaged); {DAMAGED}")


def check_tensors(state, model, full):
    """Every tensor the model has, by name, with its shape and dtype; nothing else."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{full} holds a {type(state).__name__}, not named weights; {DAMAGED}")
    wanted = describe_tensors(model.network.state_dict())
    try:
        found = describe_tensors(state)
    except AttributeError:
        raise CheckpointError(f"{full} holds values that are not tensors; {DAMAGED}") from None
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise CheckpointError(f"{full}: {'; '.join(parts)}; the checkpoint is damaged or from another model")
    for name in sorted(wanted):
        if found[name] != wanted[name]:
            raise CheckpointError(f"{full}: tensor {name} is {found[name]['dtype']} {found[name]['shape']}, this "
                                  f"model needs {wanted[name]['dtype']} {wanted[name]['shape']}; the checkpoint is "
                                  f"damaged or from another model")


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


def _load(full):
    try:
        return paddle.load(full)
    except Exception as exc:  # a damaged pickle raises nearly anything (EOFError, UnpicklingError, ...)
        raise CheckpointError(f"{full}: cannot load ({type(exc).__name__}: {str(exc)[:200]}); {DAMAGED}") from None


def load_into(model, path, with_optimizer=True):
    """Load checkpoint `path` into `model` after checking its files (size, sha256) and every weight
    tensor's name, shape and dtype against the model; CheckpointError names what is wrong."""
    meta = read_meta(path, keys=())
    names = (WEIGHTS, OPTIMIZER) if with_optimizer else (WEIGHTS,)
    for name in names:
        verify_file(path, name, meta)
    full = os.path.join(path, WEIGHTS)
    state = _load(full)
    check_tensors(state, model, full)
    try:
        model.network.set_state_dict(state)
        if with_optimizer:
            model.load_optimizer_state(_load(os.path.join(path, OPTIMIZER)))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {str(exc)[:200]}); the checkpoint is "
                              f"damaged or from another model") from None
