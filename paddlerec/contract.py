"""The contract between the runners (this package) and a model file and reader file.

Nothing model-specific lives in `paddlerec/`: the runners only call what is listed here.

Reader file (`dataset.data_converter`) defines
    class Reader(data_path: str, vocab_path: str)
        Reads and validates the data at once; raises `paddlerec.errors.DataError`
        naming file and line for bad input.
        info() -> DataInfo                   what a model built on this data needs
        batches(batch_size, training, known_items=None, shard=(0, 1), recommend=True) -> iterable
            training=False yields evaluation batches; with recommend, targets may be -1 (the
            query ended: recommend, don't rank). Each row names its query. known_items (bool
            per item id) drops items the model never saw. shard=(rank, world) splits the
            data between distributed workers. target_lists=True (evaluation) also asks for the
            list recommended at every target: rows with target -1 whose query id is
            -1 - the query's id (Coverage@K and Popularity@K are computed over these lists).
        n_queries: int                       number of sessions (queries)
    Every batch has `n_steps` (mini-batches it holds), `step_events` (int64 array: training
    targets per mini-batch) and `head(n)` (a batch of its first n mini-batches; distributed
    workers cut their epochs to a common length with it), which is all the runners use.

Model file (`phase.model`) defines
    HYPER_PARAMETERS: tuple of paddlerec.params.Param — every key `hyper_parameters` takes.
    MODEL_NAME (optional): the name results are printed under; default: the first word of the
                                         file's docstring, else the file's name.
    class Model(hparams: dict, data: DataInfo)
        network: paddle.nn.Layer             all state a checkpoint holds (parameters, buffers)
        signature() -> dict                  what must match to load a checkpoint (sizes)
        optimizer_state() -> dict            name -> Tensor; load_optimizer_state(dict)
        begin_epoch(epoch: int, training: bool)
        train_step(batch, batch_size: int) -> float64 [batch.n_steps]
                                             trains on each mini-batch; per mini-batch the SUM of its
                                             rows' losses (the update follows that sum / batch_size,
                                             batch_size being the configured mini-batch size)
        eval_step(batch, topk, tie_mode) -> EvalOutput
        known_items() -> bool array          items it may rank and recommend (evaluation drops the rest)
        grad_reducer                         None, or a function distributed training sets to combine
                                             (dense_grads, sparse_grads) between backward and update
        export(path_prefix: str, topk: int) -> dict   paddle.jit.save of one click step taking (item_ids,
                                             hidden, exclude_ids) and giving (topk_ids, topk_scores,
                                             next_hidden) — paddlerec/export.py documents them; returns
                                             inputs, outputs, n_items, hidden_size, topk, layers, unseen_items
"""

from dataclasses import dataclass
from typing import List, Optional

import numpy as np


@dataclass
class DataInfo:
    """What a model needs to know about its training data."""

    n_items: int  # item ids are 0 .. n_items-1
    item_support: Optional[np.ndarray] = None  # int64 [n_items]: training events per item
    labels: Optional[List[str]] = None  # original item id of each model id (the vocab), if known


@dataclass
class EvalOutput:
    """Evaluation of one batch."""

    ranks: np.ndarray  # float64 [n_targets]: rank of each target among all items (1 = best)
    query_ids: np.ndarray  # int64 [n_ended]: queries (sessions) that ended in this batch (< 0: lists at targets)
    topk_ids: np.ndarray  # int64 [n_ended, k]: their recommendations, best first
    topk_scores: np.ndarray  # float32 [n_ended, k]
