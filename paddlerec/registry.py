"""Runner classes: the one table of what each `class:` of a runner entry takes and does.

A RunnerClass holds
    params   the keys a runner of the class takes (checked by paddlerec/config.py, listed in README)
    run      "module:function", function(ctx: RunContext, runner_name) -> None or StopMode
    check    optional "module:function", function(ctx, runner_name), run by paddlerec.mode.prepare
             for every runner in `mode` before any of them starts (and before any data is
             read); raises a UserError
    trains   trains exactly one phase from the config's hyper_parameters (an infer runner reads
             them from each checkpoint instead; a class without a `phases` key reads no phase)
Functions are named, not imported: paddlerec/mode.py looks them up (importlib) only when a run
needs them, so config validation, which needs this table, imports no runner code, and no runner
module imports the module that calls it. A new runner class is one entry here plus its run
function (which trains and evaluates through paddlerec/loops.py).
"""

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .params import Param

RUNNER_COMMON = (
    Param("name", "str", help="name that `mode` refers to"),
    Param("class", "str", help="what the runner does"),
    Param("device", "str", "cpu", choices=("cpu", "gpu"), help="where to compute; gpu needs the CUDA build of paddlepaddle"),
    Param("phases", "names", help="phase(s) this runner runs"),
)

TRAIN_PARAMS = RUNNER_COMMON + (
    Param("epochs", "int", 1, min=1, help="epochs to train (continuing the numbering of `init_model_path`)"),
    Param("save_checkpoint_interval", "int", 1, min=0,
          help="save a checkpoint every N epochs and after the last one; 0: only after the last"),
    Param("save_checkpoint_path", "path", help="checkpoints go to `<this>/<epoch>/`"),
    Param("save_inference_interval", "int", 0, min=0,
          help="export an inference model every N epochs and after the last one; 0: never"),
    Param("save_inference_path", "path", "", help="inference models go to `<this>/<epoch>/`"),
    Param("print_interval", "int", 100, min=1, help="log loss and events/s every N mini-batches"),
    Param("init_model_path", "path", "",
          help="continue from this checkpoint (or the newest one in this folder): incremental training"),
    Param("eval_phase", "str", "", help="phase evaluated after every epoch (metrics go to the curves); empty: none"),
    Param("topk", "int", 20, min=1, help="items the exported inference model returns"),
)

INFER_PARAMS = RUNNER_COMMON + (
    Param("init_model_path", "path", help="a checkpoint, or a folder of them (each is evaluated, in epoch order)"),
    Param("predictions_path", "path", "", help="write every session's top-K to `<this>/<epoch>.txt`; empty: don't"),
    Param("topk", "int", 20, min=1, help="length of each session's recommendation list"),
    Param("cutoffs", "list[int]", [1, 5, 10, 20], min=1,
          help="K of Recall, MRR, NDCG, Coverage and Popularity @K (the printed table shows the largest)"),
    Param("tie_mode", "str", "standard", choices=("standard", "conservative", "median"),
          help="rank of a target tied with others: standard = 1 + #higher; conservative = #higher-or-equal; median"),
    Param("show_predictions", "int", 5, min=0, help="sessions whose top-K are printed"),
    Param("train_phase", "str", "",
          help="the phase the model was trained on: the popularity baseline (POP) is fitted on its data and "
               "evaluated beside every checkpoint on the same targets, and Popularity@K counts its clicks; "
               "empty: no baseline, no Popularity@K"),
    Param("metrics_path", "path", "",
          help="write every evaluation's metrics to `<this>/metrics.json` and `metrics.csv`; empty: don't"),
    Param("list_metrics", "bool", True,
          help="also ask for the list recommended at every target, for Coverage@K and Popularity@K (about "
               "doubles the evaluation's work); false: rank the targets only, as the official evaluation does"),
)

# Baselines (paddlerec/baselines.py) fitted on train_phase, evaluated like a model on `phases`.
BASELINE_PARAMS = RUNNER_COMMON + (
    Param("train_phase", "str", help="the phase whose data the baselines learn from (the model's training data)"),
    Param("baselines", "list[str]", ["pop", "spop", "iknn"], choices=("pop", "spop", "iknn"),
          help="pop: most clicked training items; spop: the session's own items first, then pop; "
               "iknn: items that co-occur in training sessions with the last click (session-rec's definitions)"),
    Param("topk", "int", 20, min=1, help="length of each recommendation list (Coverage@K, Popularity@K)"),
    Param("cutoffs", "list[int]", [1, 5, 10, 20], min=1, help="K of the metrics"),
    Param("tie_mode", "str", "standard", choices=("standard", "conservative", "median"),
          help="rank of a target tied with others, as for the infer runner"),
    Param("spop_top_n", "int", 100, min=1, help="spop: popular items that get a popularity score (the rest 0)"),
    Param("knn_n_sims", "int", 100, min=1, help="iknn: neighbours kept per item"),
    Param("knn_lambda", "float", 20.0, min=0.0, help="iknn: regularisation of the supports (discounts rare items)"),
    Param("knn_alpha", "float", 0.5, min=0.0, max=1.0, help="iknn: 0.5 cosine-like, 1.0 confidence"),
    Param("metrics_path", "path", "", help="write the metrics to `<this>/metrics.json` and `metrics.csv`; empty: don't"),
)

# A serve runner reads an exported inference model, no phase: it has no `phases` key.
SERVE_PARAMS = (
    Param("name", "str", help="name that `mode` refers to (and `python -m paddlerec.serve --runner`)"),
    Param("class", "str", help="what the runner does"),
    Param("device", "str", "cpu", choices=("cpu", "gpu"), help="where to compute; gpu needs the CUDA build of paddlepaddle"),
    Param("init_model_path", "path",
          help="an inference model folder (save_inference_path/<epoch>), or its parent (the newest epoch is served, "
               "and SIGHUP or POST /reload loads a newer one)"),
    Param("host", "str", "127.0.0.1",
          help="address to listen on; 0.0.0.0 (or ::) for every interface, e.g. in a container; `--host` overrides it"),
    Param("port", "int", 8866, min=0, max=65535,
          help="HTTP port; 0: any free port (printed at start); `--port` overrides it"),
    Param("topk", "int", 20, min=1, help="items returned per click (at most the exported model's topk)"),
    Param("exclude_seen", "bool", False,
          help="never recommend items the session already clicked; a request's `exclude_seen` overrides it"),
    Param("max_sessions", "int", 100000, min=1, help="live sessions kept; the least recently clicked one is evicted"),
    Param("session_ttl_s", "float", 1800.0, min=0.0,
          help="a session not clicked for this many seconds is dropped; 0: kept until evicted or ended"),
    Param("max_state_mb", "float", 256.0, gt=0.0,
          help="memory for the kept hidden states (sum(layers) floats each); caps max_sessions"),
    Param("max_batch", "int", 1024, min=1, help="clicks one /batch request may hold"),
    Param("threads", "int", 1, min=1, max=256, help="CPU threads of the predictor"),
)

# Distributed training (paddlerec/launch.py, paddlerec/worker.py): the train keys plus how to run the workers.
DISTRIBUTED_PARAMS = (
    Param("distribute_strategy", "str", "sync", choices=("sync", "geo", "collective", "async", "half_async"),
          help="sync: the workers' gradients are averaged every mini-batch (one exchange per step); geo: each "
               "worker trains geo_steps mini-batches alone, then the workers average their parameter and "
               "optimizer changes (geo-SGD); collective: the old name of sync; async, half_async: Paddle's "
               "parameter-server modes (checked, not available for this model)"),
    Param("geo_steps", "int", 8, min=1,
          help="geo: mini-batches each worker trains between two exchanges (and one at every epoch's end)"),
    Param("server_num", "int", 0, min=0, help="parameter servers (parameter-server strategies only; must be 0)"),
    Param("log_dir", "path", "output/log",
          help="worker logs (workerlog.N), their status files and the launcher's log; must not be shared between machines"),
    Param("start_timeout", "int", 300, min=1,
          help="seconds the workers (of every machine) have to start and meet before the job is stopped"),
)

LOCAL_CLUSTER_TRAIN_PARAMS = TRAIN_PARAMS + (
    Param("worker_num", "int", 2, min=1, max=256,
          help="worker processes on this machine; each trains its share of the sessions with batch_size rows"),
) + DISTRIBUTED_PARAMS

CLUSTER_TRAIN_PARAMS = TRAIN_PARAMS + (
    Param("master", "str", "",
          help="HOST:PORT where the machines meet (node 0's address, a free port), the same on every machine; "
               "empty: PADDLE_MASTER"),
    Param("nnodes", "int", 0, min=0, help="machines in the job; 0: PADDLE_NNODES"),
    Param("node_rank", "int", -1, min=-1,
          help="this machine's number, 0..nnodes-1 (worker 0, which saves, runs on node 0); -1: PADDLE_RANK, "
               "else in order of arrival"),
    Param("nproc_per_node", "int", 0, min=0, max=256, help="worker processes on each machine; 0: PADDLE_NPROC_PER_NODE, else 1"),
    Param("host", "str", "",
          help="this machine's address as the others reach it; empty: POD_IP, else what its hostname resolves to"),
) + DISTRIBUTED_PARAMS

# Hyper-parameter search (paddlerec/tune.py): trials of `epochs` epochs on the phase, each evaluated on eval_phase.
TUNE_PARAMS = RUNNER_COMMON + (
    Param("eval_phase", "str", help="validation phase each trial is evaluated on (e.g. train_tr -> train_valid)"),
    Param("search_space", "path", help="YAML of the ranges and choices to search (format: configs/tune_space_xe.yaml)"),
    Param("n_trials", "int", 20, min=1, help="trials of the study in all, those of an interrupted run it resumes included"),
    Param("epochs", "int", 3, min=1, help="epochs each trial trains"),
    Param("metric", "str", "recall", choices=("recall", "mrr"), help="objective: Recall@cutoff or MRR@cutoff on eval_phase "
          "after the last epoch (maximised)"),
    Param("cutoff", "int", 20, min=1, help="K of the objective"),
    Param("tie_mode", "str", "standard", choices=("standard", "conservative", "median"),
          help="rank of a target tied with others, as in the infer runner"),
    Param("seed", "int", 42, help="seed of the sampler (Optuna TPE); the model's is hyper_parameters.seed"),
    Param("study_path", "path", "output/tune/study.db",
          help="SQLite file holding the study; a search run again with it resumes (interrupted trials run again)"),
    Param("study_name", "str", "", help="study in that file; empty: the runner's name"),
    Param("best_config_path", "path", "output/tune/best.yaml",
          help="the config (this one with the best trial's settings) written at the end"),
    Param("best_mode", "names", [], help="`mode` of the written config; empty: this config's mode without tune runners"),
)


@dataclass(frozen=True)
class RunnerClass:
    name: str
    params: Tuple[Param, ...]
    run: str
    check: str = ""
    trains: bool = False

    @property
    def has_phases(self) -> bool:
        return any(p.name == "phases" for p in self.params)

    def run_function(self) -> Callable:
        return resolve(self.run)

    def check_function(self) -> Optional[Callable]:
        return resolve(self.check) if self.check else None


def resolve(reference: str) -> Callable:
    """The function a "package.module:function" reference names."""
    module_name, _, name = reference.partition(":")
    return getattr(importlib.import_module(module_name), name)


# In README's order.
RUNNER_CLASSES: Dict[str, RunnerClass] = {c.name: c for c in (
    RunnerClass("train", TRAIN_PARAMS, "paddlerec.runners:run_train", trains=True),
    RunnerClass("infer", INFER_PARAMS, "paddlerec.runners:run_infer"),
    RunnerClass("local_cluster_train", LOCAL_CLUSTER_TRAIN_PARAMS, "paddlerec.launch:run_local_cluster_train",
                check="paddlerec.launch:check_local_cluster_train", trains=True),
    RunnerClass("cluster_train", CLUSTER_TRAIN_PARAMS, "paddlerec.launch:run_cluster_train",
                check="paddlerec.launch:check_cluster_train", trains=True),
    RunnerClass("serve", SERVE_PARAMS, "paddlerec.runners:run_serve"),
    RunnerClass("baseline", BASELINE_PARAMS, "paddlerec.runners:run_baseline"),
    RunnerClass("tune", TUNE_PARAMS, "paddlerec.tune:run_tune", check="paddlerec.tune:check_tune", trains=True),
)}
