"""Baselines evaluated through the same evaluation loop as the model: POP, S-POP and item-kNN.

Their definitions follow session-rec (Ludewig & Jannach 2018, github.com/rn5l/session-rec:
algorithms/baselines/pop.py, algorithms/baselines/spop.py, algorithms/knn/iknn.py); the code is
this project's own. `supp_i` is item i's clicks in the training data.

  pop    score_i = supp_i / (supp_i + 1): the most clicked training items, the same list for
         every click.
  spop   score_i = (clicks on i so far in this session) + supp_i / (supp_i + 1) for the `top_n`
         most clicked items (0 for the others): the session's own items first, most repeated
         first, ties broken by popularity.
  iknn   score_j = sim(last clicked item, j), with
             sim(i, j) = sum over training sessions s of n_s(i) n_s(j)
                         / ((supp_i + lambda)^alpha (supp_j + lambda)^(1 - alpha)),
         n_s(i) = clicks on i in s, sim(i, i) = 0, and only each item's `n_sims` most similar
         items kept (the rest score 0).

A baseline plays the role of a model in `paddlerec.loops.evaluate`: begin_epoch, known_items and
eval_step(batch, topk, tie_mode) -> EvalOutput. Like model.py, it reads the reader's
session-parallel batch layout (step_offsets, inputs, targets, carry, sessions; see
rsc15_reader.py). Items never clicked in training are not ranked nor recommended (score -inf),
exactly as the model's score mask does, so both rank the same targets against the same items.
"""

import logging
from typing import Dict, Optional

import numpy as np

from .contract import DataInfo, EvalOutput
from .metrics import tie_ranks, top_k

log = logging.getLogger(__name__)

NAMES = {"pop": "POP", "spop": "S-POP", "iknn": "item-kNN"}


class Baseline:
    """What every baseline shares: the known-items mask, ranking with ties and the top-K lists."""

    name = ""

    def __init__(self, data: DataInfo):
        if data.item_support is None:
            raise ValueError("a baseline needs the training clicks per item (DataInfo.item_support)")
        self.n_items = int(data.n_items)
        self.support = np.asarray(data.item_support, dtype=np.float64)[:self.n_items]
        self.mask = np.where(self.support > 0, 0.0, -np.inf)  # float64 [n_items]

    def fit(self, train_batches):
        """Learn from the training data's session-parallel batches (only item-kNN needs them)."""

    def known_items(self):
        return self.support > 0

    def begin_epoch(self, epoch, training, batch_size=None):
        pass

    def step_scores(self, inputs, sessions, carry):
        """float64 [rows, n_items] scores of one session-parallel step (before the mask)."""
        raise NotImplementedError

    def eval_step(self, batch, topk, tie_mode):
        ranks, query_ids, topk_ids, topk_scores = [], [], [], []
        for s in range(batch.n_steps):
            lo, hi = int(batch.step_offsets[s]), int(batch.step_offsets[s + 1])
            targets = batch.targets[lo:hi]
            scores = self.step_scores(batch.inputs[lo:hi], batch.sessions[lo:hi], batch.carry[lo:hi]) + self.mask
            has_target = targets >= 0
            if has_target.any():
                rows = scores[has_target]
                target_scores = rows[np.arange(len(rows)), targets[has_target]][:, None]
                ranks.append(tie_ranks((rows > target_scores).sum(axis=1), (rows == target_scores).sum(axis=1),
                                       tie_mode))
            if not has_target.all():
                ids, values = top_k(scores[~has_target], topk)
                query_ids.append(batch.sessions[lo:hi][~has_target])
                topk_ids.append(ids)
                topk_scores.append(values.astype(np.float32))
        k = min(int(topk), self.n_items)
        cat = lambda parts, shape, dtype: np.concatenate(parts) if parts else np.zeros(shape, dtype)
        return EvalOutput(ranks=cat(ranks, (0,), np.float64), query_ids=cat(query_ids, (0,), np.int64),
                          topk_ids=cat(topk_ids, (0, k), np.int64), topk_scores=cat(topk_scores, (0, k), np.float32))


class Pop(Baseline):
    name = "POP"

    def __init__(self, data: DataInfo):
        super().__init__(data)
        self.scores = self.support / (self.support + 1.0)

    def step_scores(self, inputs, sessions, carry):
        return np.broadcast_to(self.scores, (len(inputs), self.n_items))


class SessionPop(Baseline):
    name = "S-POP"

    def __init__(self, data: DataInfo, top_n=100):
        super().__init__(data)
        self.popular = np.zeros(self.n_items)
        top = np.argsort(-self.support, kind="stable")[:top_n]
        self.popular[top] = self.support[top] / (self.support[top] + 1.0)
        self.clicks: Dict[int, Dict[int, int]] = {}  # session -> {item: clicks so far}

    def begin_epoch(self, epoch, training, batch_size=None):
        self.clicks = {}

    def step_scores(self, inputs, sessions, carry):
        scores = np.tile(self.popular, (len(inputs), 1))
        for row, (item, session, carried) in enumerate(zip(inputs.tolist(), sessions.tolist(), carry.tolist())):
            if session >= 0:  # the session's own click; its twins (query id -1 - session) follow it
                if carried < 0:
                    self.clicks[session] = {}
                seen = self.clicks.setdefault(session, {})
                seen[item] = seen.get(item, 0) + 1
            else:
                seen = self.clicks[-1 - session]
            for clicked, count in seen.items():
                scores[row, clicked] += count
        return scores


class ItemKNN(Baseline):
    name = "item-kNN"

    def __init__(self, data: DataInfo, n_sims=100, lmbd=20.0, alpha=0.5):
        super().__init__(data)
        self.n_sims, self.lmbd, self.alpha = int(n_sims), float(lmbd), float(alpha)
        self.neighbours = np.zeros((self.n_items, 0), dtype=np.int64)  # [n_items, n_sims]
        self.similarity = np.zeros((self.n_items, 0))

    def fit(self, train_batches):
        sessions, items = [], []
        for batch in train_batches:
            starts = batch.carry < 0  # a row whose state starts at zero plays a session's first click
            sessions += [batch.sessions[starts], batch.sessions]
            items += [batch.inputs[starts], batch.targets]
        self.fit_sessions(np.concatenate(sessions), np.concatenate(items))

    def fit_sessions(self, session_of_click, item_of_click):
        """From every training click's (session, item), in any order."""
        n = self.n_items
        order = np.argsort(session_of_click, kind="stable")
        session_of_click, item_of_click = session_of_click[order], item_of_click[order]
        bounds = np.flatnonzero(np.r_[True, session_of_click[1:] != session_of_click[:-1], True])
        # every ordered pair of clicks of a session (a, b), a's item != b's item: n_s(i) n_s(j) pairs
        pair_keys = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            clicks = item_of_click[lo:hi]
            if len(clicks) < 2:
                continue
            a, b = np.repeat(clicks, len(clicks)), np.tile(clicks, len(clicks))
            keep = a != b
            pair_keys.append(a[keep] * n + b[keep])
        keys, counts = (np.unique(np.concatenate(pair_keys), return_counts=True) if pair_keys
                        else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        first, second = keys // n, keys % n
        norm = (self.support[first] + self.lmbd) ** self.alpha * (self.support[second] + self.lmbd) ** (1 - self.alpha)
        sims = counts / np.where(norm > 0, norm, 1.0)
        # keep each item's n_sims largest (ties: the lower item id), as a padded table
        order = np.lexsort((second, -sims, first))
        first, second, sims = first[order], second[order], sims[order]
        row_start = np.searchsorted(first, np.arange(n))
        rank_in_row = np.arange(len(first)) - row_start[first]
        kept = rank_in_row < self.n_sims
        width = int(min(self.n_sims, rank_in_row.max() + 1)) if len(first) else 0
        self.neighbours = np.full((n, width), n, dtype=np.int64)  # padding: column n, dropped after scoring
        self.similarity = np.zeros((n, width))
        self.neighbours[first[kept], rank_in_row[kept]] = second[kept]
        self.similarity[first[kept], rank_in_row[kept]] = sims[kept]
        log.info("item-kNN: %d item pairs co-occur; up to %d neighbours kept per item", len(keys), width)

    def step_scores(self, inputs, sessions, carry):
        scores = np.zeros((len(inputs), self.n_items + 1))  # [rows, n_items + a column for the padding]
        np.put_along_axis(scores, self.neighbours[inputs], self.similarity[inputs], axis=1)
        return scores[:, :self.n_items]


def make_baseline(name: str, data: DataInfo, options: Optional[dict] = None) -> Baseline:
    options = options or {}
    if name == "pop":
        return Pop(data)
    if name == "spop":
        return SessionPop(data, top_n=options.get("spop_top_n", 100))
    if name == "iknn":
        return ItemKNN(data, n_sims=options.get("knn_n_sims", 100), lmbd=options.get("knn_lambda", 20.0),
                       alpha=options.get("knn_alpha", 0.5))
    raise ValueError(f"unknown baseline {name!r}; baselines: {', '.join(NAMES)}")
