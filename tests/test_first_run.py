"""The main job as a newcomer meets it (issue 12): results on stdout and the log on stderr, the
model beside the popularity baseline, curves with Recall@20 per epoch, and a summary whose serve
command and curl request work against the model the run just trained."""

import csv
import http.client
import json
import os
import re
import shlex
import subprocess
import threading

import pytest

from tests.helpers import PYTHON, REPO, run_cli

EPOCHS = 2


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("first_run")
    overrides = {"runner.cpu_train_runner.epochs": EPOCHS,
                 "runner.cpu_train_runner.save_checkpoint_interval": 1,
                 "runner.cpu_train_runner.save_checkpoint_path": out / "checkpoints",
                 "runner.cpu_train_runner.save_inference_interval": EPOCHS,
                 "runner.cpu_train_runner.save_inference_path": out / "inference",
                 "runner.cpu_infer_runner.init_model_path": out / "checkpoints",
                 "runner.cpu_infer_runner.predictions_path": out / "predictions",
                 "runner.cpu_infer_runner.metrics_path": out}
    args = ["-m", "paddlerec.run", "-m", os.path.join(REPO, "config.yaml"), "--no-progress",
            "--log-file", str(out / "run.log")]
    for key, value in overrides.items():
        args += ["-o", f"{key}={value}"]
    proc = run_cli(args, cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def table_row(stdout, name):
    match = re.search(rf"^{re.escape(name)} +([\d.]+) +([\d.]+)", stdout, re.M)
    assert match, f"no row {name!r} in:\n{stdout}"
    return float(match.group(1)), float(match.group(2))


def test_results_on_stdout_log_on_stderr_both_in_the_log_file(first_run):
    out, proc = first_run
    assert re.match(r"phase_infer: [\d,]+ targets in 1,000 sessions", proc.stdout)
    assert re.search(r"^session: \d+, top 20 items: \[", proc.stdout, re.M)
    assert not re.search(r"\d\d:\d\d:\d\d (INFO|WARNING)", proc.stdout), "log lines on stdout"
    assert "epoch 1 done" in proc.stderr
    assert "session: 0, top 20" not in proc.stderr and "Outputs:" not in proc.stderr
    logged = (out / "run.log").read_text()
    assert "epoch 1 done" in logged and "POP (baseline)" in logged and "Outputs:" in logged


def test_the_model_beats_the_popularity_baseline_on_the_same_targets(first_run):
    _, proc = first_run
    targets = int(re.match(r"phase_infer: ([\d,]+) targets", proc.stdout).group(1).replace(",", ""))
    assert targets >= 2000
    model_recall, _ = table_row(proc.stdout, f"GRU4Rec, epoch {EPOCHS}")
    pop_recall, _ = table_row(proc.stdout, "POP (baseline)")
    assert model_recall >= 2 * pop_recall, (model_recall, pop_recall)


def test_curves_hold_recall_at_20_per_epoch_and_metrics_every_evaluation(first_run):
    out, _ = first_run
    with open(out / "checkpoints" / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert all(0 < float(r["recall@20"]) <= 1 and 0 < float(r["mrr@20"]) <= 1 for r in rows)
    assert (out / "checkpoints" / "curves.png").stat().st_size > 10000
    evaluations = json.loads((out / "metrics.json").read_text())
    assert [(r["model"], r["epoch"]) for r in evaluations] == [("GRU4Rec", e) for e in range(1, EPOCHS + 1)] + \
        [("POP", "")]
    for key in ("recall@20", "mrr@20", "ndcg@20", "coverage@20", "popularity@20", "targets"):
        assert all(key in r for r in evaluations), key
    with open(out / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == len(evaluations)


def test_summary_names_the_outputs_and_its_curl_line_works_against_the_served_model(first_run):
    out, proc = first_run
    summary = proc.stdout[proc.stdout.index("Outputs:"):]
    for where in ("checkpoints", f"inference/{EPOCHS}", "curves.png", f"predictions/{EPOCHS}.txt", "metrics.json"):
        assert where in summary, where
    assert "sh data_prepare.sh" in summary
    serve = re.search(r"serve this model: +(.*)", summary).group(1)
    curl = re.search(r"then ask it: +curl -s localhost:(\d+)/click -d (.*)", summary)
    command = shlex.split(serve)
    assert command[:3] == [".venv/bin/python", "-m", "paddlerec.serve"]
    body = shlex.split(curl.group(2))[0]
    # the summary's own command, on a free port instead of 8866 (another test may hold it)
    process = subprocess.Popen([PYTHON] + command[1:] + ["--port", "0"], cwd=str(out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        port = []

        def watch():
            for line in process.stdout:
                match = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
                if match:
                    port.append(int(match.group(1)))
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        watcher.join(timeout=120)
        if not port:
            process.kill()
            raise AssertionError(f"the summary's serve command printed no URL: {process.communicate()[1][-2000:]}")
        connection = http.client.HTTPConnection("127.0.0.1", port[0], timeout=30)
        connection.request("POST", "/click", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        assert len(answer["items"]) == 20
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_failed_run_ends_its_log_file_with_the_error_line(tmp_path, capsys):
    from paddlerec.run import main

    log_file = tmp_path / "run.log"
    code = main(["-m", os.path.join(REPO, "config.yaml"), "--log-file", str(log_file),
                 "-o", "runner.cpu_infer_runner.train_phase=no_such_phase", "-o", "mode=[cpu_infer_runner]"])
    assert code == 2
    line = "config error: runner.cpu_infer_runner.train_phase: no phase named 'no_such_phase'"
    assert line in capsys.readouterr().err
    assert log_file.read_text().splitlines()[-1].startswith(line)
    assert main(["-m", os.path.join(REPO, "config.yaml"), "--log-file", str(tmp_path / "missing" / "run.log")]) == 2


def test_without_list_metrics_the_ranks_are_the_same_and_coverage_is_left_out(first_run, tmp_path):
    out, _ = first_run
    args = ["-m", "paddlerec.run", "-m", os.path.join(REPO, "config.yaml"), "--no-progress",
            "-o", "mode=[cpu_infer_runner]", "-o", f"runner.cpu_infer_runner.init_model_path={out}/checkpoints",
            "-o", "runner.cpu_infer_runner.predictions_path=", "-o", f"runner.cpu_infer_runner.metrics_path={tmp_path}",
            "-o", "runner.cpu_infer_runner.list_metrics=false"]
    proc = run_cli(args, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranked_only = json.loads((tmp_path / "metrics.json").read_text())
    with_lists = json.loads((out / "metrics.json").read_text())
    assert [r["recall@20"] for r in ranked_only] == [r["recall@20"] for r in with_lists]
    assert [r["mrr@20"] for r in ranked_only] == [r["mrr@20"] for r in with_lists]
    assert all("coverage@20" not in r and "popularity@20" not in r for r in ranked_only)
    assert re.search(r"Recall@20 +MRR@20 +NDCG@20\n", proc.stdout)  # the table without the list columns
