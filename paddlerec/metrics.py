"""Recall@K and MRR@K from target ranks, with exact integer counts."""

import logging

import numpy as np

log = logging.getLogger(__name__)


class RankMetrics:
    """Accumulates target ranks (1 = best) over batches."""

    def __init__(self, cutoffs):
        self.cutoffs = sorted(set(int(c) for c in cutoffs))
        self.targets = 0
        self.hits = {c: 0 for c in self.cutoffs}
        self.reciprocal = {c: 0.0 for c in self.cutoffs}

    def add(self, ranks):
        ranks = np.asarray(ranks, dtype=np.float64)
        self.targets += int(ranks.size)
        for c in self.cutoffs:
            inside = ranks <= c
            self.hits[c] += int(inside.sum())
            self.reciprocal[c] += float((1.0 / ranks[inside]).sum())

    def result(self):
        """{"recall@K": ..., "mrr@K": ..., "targets": n}, recall/mrr as fractions of all targets.
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
        out["targets"] = self.targets
        return out


def format_metrics(metrics):
    parts = []
    for key, value in metrics.items():
        if key.startswith(("recall@", "mrr@")):
            name = key.replace("recall", "Recall").replace("mrr", "MRR")
            parts.append(f"{name}: {value:.4f}")
    parts.append(f"targets: {metrics.get('targets', 0)}")
    return ", ".join(parts)
