"""The evaluation metrics, as session-rec defines them (Ludewig & Jannach, "Evaluation of
session-based recommendation algorithms", 2018; github.com/rn5l/session-rec, evaluation/metrics/):

  from the rank of each target (1 = best; RankMetrics)
    Recall@K   share of targets ranked within the first K (session-rec's HitRate@K)
    MRR@K      mean of 1/rank over all targets, 0 beyond K
    NDCG@K     mean of 1/log2(rank + 1) over all targets, 0 beyond K (one relevant item per
               target, so the ideal DCG is 1)
  from the top-K list recommended at each target (ListMetrics)
    Coverage@K    distinct items in any of the lists, over the items clicked in training
    Popularity@K  mean over the lists of the mean popularity of their distinct items, an item's
                  popularity being its training clicks over those of the most clicked item

Counts are exact integers where they can be; the sums of reciprocals are float64.
"""

import csv
import io
import json
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

RANK_KEYS = ("recall", "mrr", "ndcg")
LIST_KEYS = ("coverage", "popularity")
DISPLAY = {"recall": "Recall", "mrr": "MRR", "ndcg": "NDCG", "coverage": "Coverage", "popularity": "Popularity"}


def tie_ranks(higher, equal, tie_mode):
    """Rank (float64) from the count of items scoring higher and scoring equal (the target
    included). standard: 1 + #higher (ties in the target's favour); conservative: #higher +
    #equal (every tie ranked above it); median: the middle of the tied block."""
    higher = np.asarray(higher, dtype=np.float64)
    equal = np.asarray(equal, dtype=np.float64)
    if tie_mode == "standard":
        return higher + 1
    if tie_mode == "conservative":
        return higher + equal
    if tie_mode == "median":
        return higher + 0.5 * (equal - 1) + 1
    raise ValueError(f"tie_mode must be standard, conservative or median, got {tie_mode!r}")


def top_k(scores, k):
    """The k best items of each row, best first, ties broken by the lower item id (as the fused
    evaluation kernel does). scores float [n, n_items] -> (ids int64 [n, k], scores [n, k])."""
    k = min(int(k), scores.shape[1])
    # a stable sort of the negated scores keeps tied items in id order
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
    return ids, np.take_along_axis(scores, ids, axis=1)


class RankMetrics:
    """Accumulates target ranks (1 = best) over batches."""

    def __init__(self, cutoffs):
        self.cutoffs = sorted(set(int(c) for c in cutoffs))
        self.targets = 0
        self.hits = {c: 0 for c in self.cutoffs}
        self.reciprocal = {c: 0.0 for c in self.cutoffs}
        self.gain = {c: 0.0 for c in self.cutoffs}

    def add(self, ranks):
        ranks = np.asarray(ranks, dtype=np.float64)
        self.targets += int(ranks.size)
        for c in self.cutoffs:
            inside = ranks[ranks <= c]
            self.hits[c] += int(inside.size)
            self.reciprocal[c] += float((1.0 / inside).sum())
            self.gain[c] += float((1.0 / np.log2(inside + 1.0)).sum())

    def result(self):
        """{"recall@K", "mrr@K", "ndcg@K" for every K, "targets": n}: fractions of all targets.
        With no target at all they are 0 and mean nothing: said so by a warning."""
        if not self.targets:
            log.warning("the evaluation had 0 targets (no session with 2+ clicks on items the model knows), so its "
                        "metrics mean nothing; check the evaluation data and its vocab")
        n = max(self.targets, 1)
        out = {}
        for c in self.cutoffs:
            out[f"recall@{c}"] = self.hits[c] / n
        for c in self.cutoffs:
            out[f"mrr@{c}"] = self.reciprocal[c] / n
        for c in self.cutoffs:
            out[f"ndcg@{c}"] = self.gain[c] / n
        out["targets"] = self.targets
        return out


class ListMetrics:
    """Accumulates the top-K lists recommended at each target: Coverage@K and Popularity@K.

    train_clicks: int [n_items], training clicks per item (the items with none are not
    counted as recommendable). Without with_popularity (when only which items were clicked in
    training is known, not how often) Popularity@K is left out. So are cutoffs larger than the
    lists."""

    def __init__(self, cutoffs, train_clicks, with_popularity=True):
        clicks = np.asarray(train_clicks, dtype=np.float64)
        self.cutoffs = sorted(set(int(c) for c in cutoffs))
        self.n_train_items = int((clicks > 0).sum())
        self.popularity = clicks / max(clicks.max(), 1.0)
        self.lists = 0
        self.seen = {c: np.zeros(len(clicks), dtype=bool) for c in self.cutoffs}
        self.popularity_sum = {c: 0.0 for c in self.cutoffs}
        self.width = None  # length of the lists seen
        self.with_popularity = with_popularity

    def add(self, topk_ids):
        topk_ids = np.asarray(topk_ids, dtype=np.int64)
        if topk_ids.ndim != 2 or len(topk_ids) == 0:
            return
        self.width = topk_ids.shape[1] if self.width is None else min(self.width, topk_ids.shape[1])
        self.lists += len(topk_ids)
        for c in self.cutoffs:
            head = np.sort(topk_ids[:, :c], axis=1)  # [n, c]; sorted, so repeated ids are neighbours
            self.seen[c][head.ravel()] = True
            # session-rec averages over the distinct items of a list: a repeated id counts once
            distinct = np.ones(head.shape, dtype=bool)
            distinct[:, 1:] = head[:, 1:] != head[:, :-1]
            pop = self.popularity[head] * distinct
            self.popularity_sum[c] += float((pop.sum(axis=1) / distinct.sum(axis=1)).sum())

    def result(self):
        """{"coverage@K", "popularity@K" for every K the lists are long enough for, "lists": n}."""
        out = {}
        usable = [c for c in self.cutoffs if self.width is None or c <= self.width]
        for c in usable:
            out[f"coverage@{c}"] = int(self.seen[c].sum()) / max(self.n_train_items, 1)
        for c in usable if self.with_popularity else ():
            out[f"popularity@{c}"] = self.popularity_sum[c] / max(self.lists, 1)
        out["lists"] = self.lists
        return out


def metric_keys(metrics, kinds=RANK_KEYS + LIST_KEYS):
    """The metric keys of a result dict, grouped by kind (in `kinds` order), K ascending."""
    keys = []
    for kind in kinds:
        keys += sorted((k for k in metrics if k.startswith(kind + "@")), key=lambda k: int(k.split("@")[1]))
    return keys


def display_name(key):
    kind, cutoff = key.split("@")
    return f"{DISPLAY.get(kind, kind)}@{cutoff}"


def format_metrics(metrics):
    parts = [f"{display_name(key)}: {metrics[key]:.4f}" for key in metric_keys(metrics)]
    parts.append(f"targets: {metrics.get('targets', 0)}")
    return ", ".join(parts)


def comparison_table(rows, keys):
    """A plain-text table, one row per (name, metrics): the metric columns in `keys`."""
    width = max([len(name) for name, _ in rows] + [5])
    columns = [max(len(display_name(k)), 6) for k in keys]
    lines = [f"{'':<{width}}" + "".join(f"  {display_name(k):>{w}}" for k, w in zip(keys, columns))]
    for name, metrics in rows:
        cells = []
        for k, w in zip(keys, columns):
            value = metrics.get(k)
            number = isinstance(value, (int, float)) and not math.isnan(value)
            cells.append(f"  {value:>{w}.4f}" if number else f"  {'-':>{w}}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return lines


def metrics_files(rows):
    """(json text, csv text) of a list of flat metric rows (dicts), columns in first-seen order."""
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return json.dumps(rows, indent=1, default=str), text.getvalue()
