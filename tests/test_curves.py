"""Training curves (paddlerec/curves.py) and progress bars (paddlerec/progress.py)."""

import csv
import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import types

import pytest

from tests.helpers import PYTHON, REPO

CONFIG = os.path.join(REPO, "config.yaml")


def rows_with_metrics(epochs):
    return [{"epoch": e, "loss": 5.0 / e, "events": 100, "seconds": 1.0, "events_per_s": 100.0,
             "recall@5": 0.1 * e, "recall@20": 0.2 * e, "mrr@5": 0.05 * e, "mrr@20": 0.06 * e} for e in epochs]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_history_writes_csv_json_and_a_panel_per_quantity(tmp_path):
    from paddlerec.curves import History

    history = History(str(tmp_path), title="run")
    for row in rows_with_metrics([1, 2, 3]):
        history.add(row)
    table = read_csv(tmp_path / "curves.csv")
    assert [int(r["epoch"]) for r in table] == [1, 2, 3]
    assert float(table[1]["recall@20"]) == pytest.approx(0.4)
    assert json.loads((tmp_path / "curves.json").read_text()) == rows_with_metrics([1, 2, 3])
    width_with_metrics, height = png_size(tmp_path / "curves.png")

    plain = tmp_path / "plain"
    history = History(str(plain))
    history.add({"epoch": 1, "loss": 2.0, "events": 10, "seconds": 1.0, "events_per_s": 10.0})
    width_loss_only, height_loss_only = png_size(plain / "curves.png")
    assert height_loss_only == height
    # loss, Recall@K and MRR@K panels side by side vs the loss panel alone
    assert width_with_metrics == pytest.approx(3 * width_loss_only, rel=0.02)


def test_continued_run_keeps_earlier_epochs_and_a_new_run_drops_stale_ones(tmp_path):
    from paddlerec.curves import History

    first = History(str(tmp_path))
    for row in rows_with_metrics([1, 2, 3]):
        first.add(row)
    continued = History(str(tmp_path), start_epoch=2)  # resumed from checkpoint 2: epoch 3 is retrained
    assert [r["epoch"] for r in continued.rows] == [1, 2]
    continued.add(dict(rows_with_metrics([3])[0], loss=9.0))
    rows = json.loads((tmp_path / "curves.json").read_text())
    assert [(r["epoch"], r["loss"]) for r in rows] == [(1, 5.0), (2, 2.5), (3, 9.0)]
    fresh = History(str(tmp_path), start_epoch=0)
    fresh.add(rows_with_metrics([1])[0])
    assert [r["epoch"] for r in read_csv(tmp_path / "curves.csv")] == ["1"]


def test_unreadable_history_is_reported_and_replaced(tmp_path, caplog):
    from paddlerec.curves import History

    (tmp_path / "curves.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="paddlerec.curves"):
        history = History(str(tmp_path), start_epoch=5)
    assert history.rows == []
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_missing_visualdl_is_logged_once_per_run(tmp_path, caplog, monkeypatch):
    from paddlerec.curves import History

    monkeypatch.setitem(sys.modules, "visualdl", None)  # import visualdl -> ImportError
    with caplog.at_level(logging.INFO, logger="paddlerec.curves"):
        history = History(str(tmp_path))
        for row in rows_with_metrics([1, 2]):
            history.add(row)
    notes = [r for r in caplog.records if "visualdl is not installed" in r.getMessage()]
    assert len(notes) == 1
    assert not (tmp_path / "visualdl").exists()


def test_visualdl_gets_every_scalar_per_epoch(tmp_path, monkeypatch):
    from paddlerec.curves import History

    calls = []

    class FakeWriter:
        def __init__(self, logdir):
            calls.append(("logdir", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            calls.append(("flush",))

    monkeypatch.setitem(sys.modules, "visualdl", types.SimpleNamespace(LogWriter=FakeWriter))
    history = History(str(tmp_path))
    for row in rows_with_metrics([1, 2]):
        history.add(row)
    assert calls[0] == ("logdir", os.path.join(str(tmp_path), "visualdl"))
    scalars = {(c[0], c[2]): c[1] for c in calls if len(c) == 3}
    assert scalars[("train/loss", 2)] == pytest.approx(2.5)
    assert scalars[("eval/recall@20", 1)] == pytest.approx(0.2)
    assert scalars[("eval/mrr@5", 2)] == pytest.approx(0.1)
    assert ("train/events", 1) not in scalars
    assert calls.count(("flush",)) == 2


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_when_enabled(monkeypatch):
    from paddlerec import progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress.progress_bar(True, total=3), progress._Silent)  # not a terminal
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert isinstance(progress.progress_bar(False, total=3), progress._Silent)  # --no-progress
    handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(handler)
    try:
        with progress.progress_bar(True, total=4, desc="epoch 7", unit="ev") as bar:
            bar.update(4)
            bar.set_postfix_str("loss 1.2345")
            logging.getLogger("paddlerec.test").warning("a log line during the bar")
    finally:
        logging.getLogger().removeHandler(handler)
    shown = terminal.getvalue()
    assert "epoch 7" in shown and "4/4" in shown and "loss 1.2345" in shown
    assert "a log line during the bar\n" in shown  # written through tqdm, on its own line
    assert logging.getLogger().handlers.count(handler) == 0  # the redirect was undone


def run_in_pty(args):
    """Run a command with stderr (and stdout) on a pseudo-terminal; returns (exit code, output)."""
    main, child = pty.openpty()
    process = subprocess.Popen([PYTHON] + args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                               env=dict(os.environ, PYTHONPATH=REPO))
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    return process.wait(timeout=300), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """Two epochs on the sample data, evaluated on the training sessions, on a terminal."""
    root = tmp_path_factory.mktemp("curves")
    overrides = ["mode=[cpu_train_runner]", "runner.cpu_train_runner.epochs=2",
                 f"runner.cpu_train_runner.save_checkpoint_path={root}/ck", "runner.cpu_train_runner.eval_phase=phase_train",
                 "runner.cpu_train_runner.save_inference_interval=0", "hyper_parameters.n_sample=64"]
    args = ["-m", "paddlerec.run", "-m", CONFIG]
    for o in overrides:
        args += ["-o", o]
    code, output = run_in_pty(args)
    assert code == 0, output[-3000:]
    return root, args, output


@pytest.mark.slow
def test_train_run_writes_curves_with_eval_metrics(sample_run):
    root, _, _ = sample_run
    table = read_csv(root / "ck" / "curves.csv")
    assert [int(r["epoch"]) for r in table] == [1, 2]
    for key in ("loss", "events", "events_per_s", "recall@20", "mrr@20"):
        assert all(r[key] != "" for r in table), key
    assert all(0.0 <= float(r["recall@20"]) <= 1.0 for r in table)
    rows = json.loads((root / "ck" / "curves.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    width, height = png_size(root / "ck" / "curves.png")
    assert width > 2 * height  # loss, Recall@K and MRR@K side by side


@pytest.mark.slow
def test_progress_bars_on_a_terminal_and_log_lines_stay(sample_run):
    _, _, output = sample_run
    assert re.search(r"epoch 1: +\d+%\|.*\| *\d+/\d+ \[", output)  # the training bar, with its total
    assert "ev/s" in output
    assert "evaluate:" in output and "targets" in output  # the per-epoch evaluation bar (targets ranked)
    assert "epoch 2 done" in output and "epoch 2 eval on phase_train" in output  # the log lines


@pytest.mark.slow
def test_no_progress_flag_and_a_continued_run_extends_the_curves(sample_run):
    root, _, _ = sample_run
    args = ["-m", "paddlerec.run", "-m", CONFIG, "--no-progress", "-o", "mode=[incremental_train_runner]",
            "-o", "runner.incremental_train_runner.epochs=1", "-o", "runner.incremental_train_runner.save_inference_interval=0",
            "-o", f"runner.incremental_train_runner.init_model_path={root}/ck",
            "-o", f"runner.incremental_train_runner.save_checkpoint_path={root}/ck", "-o", "hyper_parameters.n_sample=64"]
    code, output = run_in_pty(args)
    assert code == 0, output[-3000:]
    assert "epoch 3 done" in output
    assert not re.search(r"\|\s*\d+/\d+ \[", output)  # no bar drawn ("...| 321/321 [00:01<...")
    rows = json.loads((root / "ck" / "curves.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert "recall@20" in rows[1] and "recall@20" not in rows[2]  # the continued run has no eval_phase
