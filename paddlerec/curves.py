"""Per-epoch training curves: `curves.csv`, `curves.json` and `curves.png` in the checkpoint folder.

A resumed (incremental) run appends to the history the earlier run left there.
"""

import csv
import io
import json
import logging
import os

log = logging.getLogger(__name__)


class History:
    def __init__(self, folder):
        self.folder = folder
        self.rows = []
        path = os.path.join(folder, "curves.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    self.rows = json.load(f)
            except (OSError, ValueError):
                log.warning("%s is unreadable; starting a new history", path)
                self.rows = []

    def add(self, row):
        self.rows = [r for r in self.rows if r.get("epoch") != row["epoch"]] + [row]
        self.rows.sort(key=lambda r: r["epoch"])
        self.write()

    def write(self):
        os.makedirs(self.folder, exist_ok=True)
        keys = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        _replace(os.path.join(self.folder, "curves.csv"), text.getvalue())
        _replace(os.path.join(self.folder, "curves.json"), json.dumps(self.rows, indent=1))
        plot(self.rows, os.path.join(self.folder, "curves.png"))


def _replace(path, text):
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def plot(rows, path):
    """Loss and (when evaluated) Recall/MRR per epoch, as a PNG. Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [r["epoch"] for r in rows]
    metric_keys = [k for k in (rows[-1] if rows else {}) if k.startswith(("recall@", "mrr@"))]
    fig, axes = plt.subplots(1, 2 if metric_keys else 1, figsize=(10 if metric_keys else 5, 3.5), squeeze=False)
    axes[0][0].plot(epochs, [r["loss"] for r in rows], marker="o")
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss per event")
    if metric_keys:
        for key in metric_keys:
            axes[0][1].plot(epochs, [r.get(key) for r in rows], marker="o", label=key)
        axes[0][1].set_xlabel("epoch")
        axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    tmp = path + f".tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
