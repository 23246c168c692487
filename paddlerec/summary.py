"""The few lines a run ends with: where its outputs are, and the commands that lead on
(serving this very model with a request that works against it, and the real data set)."""

import json
import os
import shlex
from typing import List

from .registry import RUNNER_CLASSES

SERVE_HOST = "localhost"


def shown(path):
    """A path as the user would type it from the current folder."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def newest_epoch_folder(folder):
    """The numbered sub-folder of the highest epoch (what a serve runner picks in a parent), or None."""
    if not os.path.isdir(folder):
        return None
    epochs = [int(name) for name in os.listdir(folder) if name.isdigit() and os.path.isdir(os.path.join(folder, name))]
    return os.path.join(folder, str(max(epochs))) if epochs else None


def example_item(ctx, phase_name):
    """The most clicked item of a phase's data, as the server takes it (original id with a
    vocab, model id without), or None."""
    import numpy as np

    reader = ctx.readers.get(ctx.config.phases[phase_name]["dataset_name"])
    if reader is None:
        return None
    info = reader.info()
    if info.item_support is None or not info.item_support.any():
        return None
    best = int(np.argmax(info.item_support))
    return info.labels[best] if info.labels is not None else str(best)


def serve_lines(ctx, export, train_phase) -> List[str]:
    config = ctx.config
    serve = [name for name, r in config.runners.items() if r["class"] == "serve"]
    item = example_item(ctx, train_phase)
    if not serve or item is None:
        return []
    name = serve[0]
    runner = config.runners[name]
    command = [".venv/bin/python", "-m", "paddlerec.serve", "-m", shown(config.path)]
    if len(serve) > 1:
        command += ["--runner", name]
    serves = runner["init_model_path"]
    if os.path.abspath(export) not in (os.path.abspath(serves), os.path.abspath(newest_epoch_folder(serves) or "")):
        # absolute: a relative path in an override is read from the config's workspace, not from here
        command += ["-o", f"runner.{name}.init_model_path={os.path.abspath(export)}"]
    port = runner["port"] or "PORT"
    body = json.dumps({"session": "u1", "item": item})
    return [f"  serve this model:  {shlex.join(command)}",
            f"  then ask it:       curl -s {SERVE_HOST}:{port}/click -d {shlex.quote(body)}"
            + ("   (PORT: the one the server prints)" if port == "PORT" else "")]


def summary_lines(ctx) -> List[str]:
    """What the runners in `mode` wrote, and what to run next; [] when they wrote nothing."""
    config = ctx.config
    outputs, export, train_phase = [], None, None
    for runner_name in config.mode:
        runner = config.runners[runner_name]
        cls = RUNNER_CLASSES[runner["class"]]
        rows = ctx.results.get(runner_name, {})
        if cls.trains and rows.get("epochs"):
            last = max(r["epoch"] for r in rows["epochs"])
            folder = runner["save_checkpoint_path"]
            outputs.append(("checkpoints", f"{shown(folder)}/<epoch>/ (newest: epoch {last})"))
            if os.path.isfile(os.path.join(folder, "curves.png")):
                outputs.append(("training curves", shown(os.path.join(folder, "curves.png"))
                                + " (and curves.csv, curves.json)"))
            if runner.get("save_inference_path") and os.path.isdir(os.path.join(runner["save_inference_path"], str(last))):
                export = os.path.join(runner["save_inference_path"], str(last))
                train_phase = runner["phases"][0]
                outputs.append(("inference model", shown(export)))
        if runner["class"] == "infer" and rows.get("evaluations"):
            last = rows["evaluations"][-1]["epoch"]
            if runner["predictions_path"]:
                outputs.append(("predictions", shown(os.path.join(runner["predictions_path"], f"{last}.txt"))
                                + f" (each test session's top {runner['topk']})"))
            if runner.get("metrics_path"):
                outputs.append(("metrics", shown(os.path.join(runner["metrics_path"], "metrics.json"))
                                + " (and metrics.csv)"))
    if not outputs:
        return []
    width = max(len(what) for what, _ in outputs)
    lines = ["", "Outputs:"] + [f"  {what + ':':<{width + 1}}  {where}" for what, where in outputs]
    nexts = serve_lines(ctx, export, train_phase) if export else []
    nexts.append("  real data (RSC15): sh data_prepare.sh && .venv/bin/python -m paddlerec.run -m data/config.yaml")
    return lines + ["Next:"] + nexts
