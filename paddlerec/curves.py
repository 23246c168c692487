"""Per-epoch training curves in the checkpoint folder: curves.csv, curves.json, curves.png,
and VisualDL scalars (visualdl/) when the visualdl package is installed.

One row per epoch: loss (mean per training event), events, seconds, events_per_s and, when
the train runner has an `eval_phase`, that phase's recall@K / mrr@K. A run that continues
from a checkpoint (incremental training) keeps the rows up to its starting epoch; rows of
later epochs come from an older run and are dropped.
"""

import csv
import io
import json
import logging
import os

from .files import atomic_paths, write_text

log = logging.getLogger(__name__)

CSV, JSON, PNG, VISUALDL = "curves.csv", "curves.json", "curves.png", "visualdl"
TRAIN_KEYS = ("loss", "events_per_s")  # scalars logged under train/ in VisualDL


def is_metric(key):
    return key.startswith(("recall@", "mrr@"))


def _cutoff(key):
    return int(key.split("@", 1)[1]) if key.split("@", 1)[1].isdigit() else 0


class History:
    """The rows of one training run (plus what an earlier run it continues left there)."""

    def __init__(self, folder, start_epoch=0, title=""):
        self.folder = folder
        self.title = title
        self.rows = [r for r in self._read() if r["epoch"] <= start_epoch]
        self.visualdl = _visualdl_writer(os.path.join(folder, VISUALDL))

    def _read(self):
        path = os.path.join(self.folder, JSON)
        if not os.path.isfile(path):
            return []
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
            if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("epoch"), int)
                                                     for r in rows):
                raise ValueError("not a list of rows with an epoch")
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s); starting a new history", path, exc)
            return []
        return rows

    def add(self, row):
        self.rows = [r for r in self.rows if r.get("epoch") != row["epoch"]] + [dict(row)]
        self.rows.sort(key=lambda r: r["epoch"])
        self.write()
        if self.visualdl is not None:
            self._log_visualdl(row)

    def write(self):
        os.makedirs(self.folder, exist_ok=True)
        keys = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(os.path.join(self.folder, CSV), text.getvalue())
        write_text(os.path.join(self.folder, JSON), json.dumps(self.rows, indent=1))
        plot(self.rows, os.path.join(self.folder, PNG), self.title)

    def _log_visualdl(self, row):
        try:
            for key, value in row.items():
                if key in TRAIN_KEYS:
                    self.visualdl.add_scalar(tag=f"train/{key}", value=float(value), step=row["epoch"])
                elif is_metric(key):
                    self.visualdl.add_scalar(tag=f"eval/{key}", value=float(value), step=row["epoch"])
            self.visualdl.flush()
        except Exception as exc:  # a VisualDL failure must not stop training: report it, stop logging there
            log.warning("VisualDL logging failed (%s: %s); curves.csv/json/png are still written",
                        type(exc).__name__, exc)
            self.visualdl = None


def _visualdl_writer(logdir):
    """A visualdl LogWriter, or None (logged once per run) when the package is missing or broken."""
    try:
        from visualdl import LogWriter
    except ImportError:
        log.info("visualdl is not installed: no VisualDL logs (curves.csv/json/png are written; "
                 "`pip install visualdl` to get them)")
        return None
    except Exception as exc:  # e.g. an incompatible protobuf raises at import
        log.warning("visualdl cannot be imported (%s: %s): no VisualDL logs", type(exc).__name__, exc)
        return None
    log.info("VisualDL logs in %s (visualdl --logdir %s)", logdir, logdir)
    return LogWriter(logdir=logdir)


def plot(rows, path, title=""):
    """Training loss, Recall@K and MRR@K per epoch in one PNG (metrics panels when evaluated)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install -r requirements.txt)", path)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = []
    for row in rows:
        keys += [k for k in row if is_metric(k) and k not in keys]
    recall = sorted((k for k in keys if k.startswith("recall@")), key=_cutoff)
    mrr = sorted((k for k in keys if k.startswith("mrr@")), key=_cutoff)
    panels = [("training loss per event", ["loss"])]
    if recall:
        panels.append(("Recall@K (eval)", recall))
    if mrr:
        panels.append(("MRR@K (eval)", mrr))

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (label, series) in zip(axes[0], panels):
        for key in series:
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=4, label=key if len(series) > 1 else None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(series) > 1:  # beside the panel: inside, it would hide the points it names
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=1.2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_paths(path) as (tmp,):
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
