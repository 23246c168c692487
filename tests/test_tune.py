"""The tune runner: search-space checking, trials on tiny data, the SQLite study resuming, the
written config, the message when Optuna is missing, and the tuning entries of data_prepare's config."""

import json
import os
import sys

import pytest
import yaml

from paddlerec import tune
from paddlerec.config import load_config
from paddlerec.errors import ConfigError

from .helpers import REPO, assert_one_clean_error, base_config, entry, make_workspace
from .helpers import run_cli as run_python
from .helpers import run_paddlerec as run_cli

sys.path.insert(0, os.path.join(REPO, "data"))

import model  # noqa: E402

SPACE = {
    "layers": {"type": "int", "low": 8, "high": 16, "step": 4},
    "batch_size": {"type": "categorical", "choices": [4, 8]},
    "optimizer.learning_rate": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
    "dropout_hidden": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
}


def tune_workspace(folder, space=None, **runner):
    """A tiny workspace whose config has train/infer runners and a tune runner named `tune`."""
    config = base_config()
    config["mode"] = ["train", "infer"]
    config["runner"].append(dict({
        "name": "tune", "class": "tune", "phases": ["phase_train"], "eval_phase": "phase_test",
        "search_space": "{workspace}/space.yaml", "n_trials": 2, "epochs": 1, "cutoff": 5, "seed": 3,
        "study_path": "{workspace}/tune/study.db", "best_config_path": "{workspace}/tune/best.yaml"}, **runner))
    path = make_workspace(folder, config)
    with open(os.path.join(str(folder), "space.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(space or SPACE, f)
    return path


def trial_lines(stdout):
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(stdout.strip().splitlines()), stdout  # stdout holds the JSON lines only
    return rows


# ---- the search space ------------------------------------------------------------------------

def write_space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, fragments", [
    ("layrs: {type: int, low: 8, high: 16}", ["layrs", "unknown key", "did you mean 'layers'"]),
    ("layers: {type: integer, low: 8, high: 16}", ["layers.type", "'integer' is not one of: int, float, categorical"]),
    ("layers: {type: int, low: 16, high: 8}", ["layers", "low (16) is above high (8)"]),
    ("layers: {type: int, low: 8}", ["layers.high", "missing"]),
    ("layers: {type: int, low: 8.5, high: 16}", ["layers.low", "expected an int"]),
    ("layers: {type: float, low: 8, high: 16}", ["layers.type", "int values"]),
    ("layers: {type: int, low: 0, high: 16}", ["layers.low", "must be >= 1"]),
    ("dropout_embed: {type: float, low: 0.0, high: 1.5}", ["dropout_embed.high", "must be <= 0.95"]),
    ("optimizer.momentum: {type: float, low: 0.0, high: 0.5, log: true}", ["log range needs low > 0"]),
    ("optimizer.learning_rate: {type: float, low: 0.01, high: 0.2, log: true, step: 0.01}",
     ["log and step exclude each other"]),
    ("optimizer.learning_rate: {type: float, low: 0.01, high: 0.2, step: -0.01}", ["step", "positive"]),
    ("optimizer.learning_rate: {type: float, low: 0.01, high: 0.2, scale: log}", ["scale", "unknown key"]),
    ("loss: {type: categorical, choices: []}", ["loss.choices", "non-empty list"]),
    ("loss: {type: categorical, choices: [cross-entropy, hinge]}", ["loss.choices[1]", "'hinge' is not one of"]),
    ("batch_size: {type: categorical, choices: [32, 0]}", ["batch_size.choices[1]", "must be >= 1"]),
    ("layers: [8, 16]", ["layers", "expected a mapping"]),
    ("", ["the search space is empty"]),
    ("layers: {type: int, low: 8\n  high: 16}", ["YAML syntax error"]),
])
def test_search_space_errors_name_the_entry(tmp_path, text, fragments):
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        tune.read_search_space(path, model.HYPER_PARAMETERS, "runner.t.search_space")
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


def test_search_space_missing_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"runner\.t\.search_space: no such file"):
        tune.read_search_space(str(tmp_path / "nope.yaml"), model.HYPER_PARAMETERS, "runner.t.search_space")


def test_search_space_values_become_config_values(tmp_path):
    text = ("layers: {type: categorical, choices: [64, [32, 32]]}\nbatch_size: {type: int, low: 16, high: 64, step: 16}\n"
            "optimizer.momentum: {type: float, low: 0.0, high: 0.9}\n")
    space = tune.read_search_space(write_space(tmp_path, text), model.HYPER_PARAMETERS, "k")
    assert [d.name for d in space] == ["layers", "batch_size", "optimizer.momentum"]
    assert space[1] == tune.Dimension("batch_size", "int", 16, 64, 16, False)
    hyper, batch_size = tune.split_values({"layers": 64, "batch_size": 32, "optimizer.momentum": 0.3},
                                          model.HYPER_PARAMETERS)
    assert hyper == {"layers": [64], "optimizer.momentum": 0.3} and batch_size == 32
    assert tune.split_values({"layers": [32, 32]}, model.HYPER_PARAMETERS)[0] == {"layers": [32, 32]}
    nested = tune.with_values({"optimizer": {"class": "adagrad", "learning_rate": 0.1}, "layers": [100]}, hyper)
    assert nested == {"optimizer": {"class": "adagrad", "learning_rate": 0.1, "momentum": 0.3}, "layers": [64]}


def test_a_bad_search_space_stops_the_run_before_any_work(tmp_path):
    pytest.importorskip("optuna")
    config = tune_workspace(tmp_path, space={"layers": {"type": "int", "low": 16, "high": 8}})
    proc = run_cli(["-m", config, "-o", "mode=[train, tune]"])
    assert_one_clean_error(proc, 2, "space.yaml: layers: low (16) is above high (8)")
    assert not os.path.exists(tmp_path / "ckpt")  # the train runner before it did not start


# ---- runs ------------------------------------------------------------------------------------

def test_two_trials_write_a_ready_config_and_a_resumed_study_adds_only_the_missing_trials(tmp_path, capsys):
    pytest.importorskip("optuna")
    config = tune_workspace(tmp_path)
    proc = run_cli(["-m", config, "-o", "mode=tune"])
    assert proc.returncode == 0, proc.stderr
    rows = trial_lines(proc.stdout)
    trials, best = rows[:-1], rows[-1]
    assert [r["trial"] for r in trials] == [0, 1] and all(r["state"] == "complete" for r in trials)
    for row in trials:
        assert set(row["params"]) == set(SPACE) and row["objective"] == "recall@5"
        assert row["value"] == row["recall@5"] and 0.0 <= row["value"] <= 1.0 and row["targets"] > 0
        assert row["params"]["layers"] in (8, 12, 16) and row["params"]["batch_size"] in (4, 8)
    winner = max(trials, key=lambda r: (r["value"], -r["trial"]))
    assert best["event"] == "best" and best["trial"] == winner["trial"] and best["params"] == winner["params"]

    written = load_config(str(tmp_path / "tune" / "best.yaml"))  # loads, with its files, as a user would run it
    params = winner["params"]
    assert written.mode == ["train", "infer"]  # the config's own mode (the -o mode=tune is not kept)
    assert written.hyper_parameters["layers"] == [params["layers"]]
    assert written.hyper_parameters["optimizer"]["learning_rate"] == params["optimizer.learning_rate"]
    assert written.hyper_parameters["dropout_hidden"] == params["dropout_hidden"]
    assert written.hyper_parameters["optimizer"]["momentum"] == 0.2  # untuned keys as the config has them
    assert written.datasets["train_data"]["batch_size"] == params["batch_size"]
    assert written.datasets["test_data"]["batch_size"] == 16  # evaluation's batch size is not tuned
    assert written.workspace == str(tmp_path)

    # the same study with n_trials 3 runs one more trial, numbered on
    from paddlerec.loops import RunContext
    from paddlerec.mode import run

    run(RunContext(load_config(config, ["mode=tune", "runner.tune.n_trials=3"]), show_progress=False))
    assert [r["trial"] for r in trial_lines(capsys.readouterr().out)[:-1]] == [2]

    # the ready config trains and evaluates
    ctx = RunContext(load_config(str(tmp_path / "tune" / "best.yaml"), ["runner.train.epochs=1"]), show_progress=False)
    run(ctx)
    assert [row["epoch"] for row in ctx.results["infer"]["evaluations"]] == [1]


def test_an_interrupted_trial_runs_again_on_resume(tmp_path, monkeypatch, capsys):
    """A run stopped in the middle of its second trial leaves that trial open in the study; the
    next run closes it, runs its settings again and completes the study's n_trials."""
    pytest.importorskip("optuna")
    from paddlerec.loops import RunContext
    from paddlerec.mode import run

    config_path = tune_workspace(tmp_path, n_trials=3)
    real_trial = tune.run_trial
    calls = []

    def stopped_in_trial_two(ctx, runner_name, number, values, model_params):
        calls.append(values)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would: no result is told to the study
        return real_trial(ctx, runner_name, number, values, model_params)

    monkeypatch.setattr(tune, "run_trial", stopped_in_trial_two)
    with pytest.raises(KeyboardInterrupt):
        run(RunContext(load_config(config_path, ["mode=tune"]), show_progress=False))
    first = trial_lines(capsys.readouterr().out)
    assert [r["trial"] for r in first] == [0]
    assert not os.path.exists(tmp_path / "tune" / "best.yaml")

    monkeypatch.setattr(tune, "run_trial", real_trial)
    ctx = RunContext(load_config(config_path, ["mode=tune"]), show_progress=False)
    run(ctx)
    rows = trial_lines(capsys.readouterr().out)
    trials = rows[:-1]
    assert [r["trial"] for r in trials] == [2, 3]  # trial 1 was closed as failed; 2 reruns its settings
    assert trials[0]["params"] == calls[1]
    assert os.path.isfile(tmp_path / "tune" / "best.yaml")

    import optuna

    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def test_a_study_refuses_to_resume_with_another_search_space(tmp_path, capsys):
    pytest.importorskip("optuna")
    from paddlerec.loops import RunContext
    from paddlerec.mode import run

    config = tune_workspace(tmp_path, n_trials=1)
    run(RunContext(load_config(config, ["mode=tune"]), show_progress=False))
    assert [r["trial"] for r in trial_lines(capsys.readouterr().out)] == [0, 0]  # the trial and the best
    with open(tmp_path / "space.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(dict(SPACE, layers={"type": "int", "low": 8, "high": 32, "step": 8}), f)
    with pytest.raises(ConfigError) as caught:
        run(RunContext(load_config(config, ["mode=tune", "runner.tune.n_trials=2"]), show_progress=False))
    for fragment in ("runner.tune.study_path", "another space", "another study_name"):
        assert fragment in str(caught.value)
    assert capsys.readouterr().out == ""  # no trial ran


def test_missing_optuna_is_one_line_naming_the_fix(tmp_path):
    config = tune_workspace(tmp_path)
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "optuna.py").write_text("raise ImportError('No module named optuna')\n")
    proc = run_python(["-m", "paddlerec.run", "--no-progress", "-m", config, "-o", "mode=[train, tune]"],
                      env={"PYTHONPATH": os.pathsep.join([str(blocker), REPO])})
    line = assert_one_clean_error(proc, 2, "the tune runner needs Optuna",
                                  "pip install -r requirements-tune.txt")
    assert line.startswith("error: ")
    assert not os.path.exists(tmp_path / "ckpt")  # checked before the train runner started


@pytest.mark.parametrize("override, fragments", [
    ("runner.tune.best_mode=[tune]", ["runner.tune.best_mode", "is a tune runner"]),
    ("runner.tune.best_mode=[nope]", ["runner.tune.best_mode", "no runner named 'nope'"]),
    ("runner.tune.eval_phase=", ["runner.tune.eval_phase", "missing"]),
])
def test_tune_runner_checks(tmp_path, override, fragments):
    pytest.importorskip("optuna")
    from paddlerec.loops import RunContext
    from paddlerec.mode import prepare

    config = load_config(tune_workspace(tmp_path), ["mode=tune", override])
    with pytest.raises(ConfigError) as caught:
        prepare(RunContext(config, show_progress=False))
    for fragment in fragments:
        assert fragment in str(caught.value)


# ---- data_prepare.sh's config ----------------------------------------------------------------

def test_the_prepared_config_tunes_on_the_tuning_split(tmp_path):
    import text2paddle

    out = tmp_path / "data"
    (out / "tune").mkdir(parents=True)
    (out / "tune" / "vocab.txt").write_text("1\n2\n")
    with open(os.path.join(REPO, "config.yaml"), encoding="utf-8") as f:
        repo_config = yaml.safe_load(f)
    config = text2paddle.make_config(repo_config, str(out), REPO)
    tr, valid = entry(config, "dataset", "dataset_train_tr"), entry(config, "dataset", "dataset_train_valid")
    assert tr["data_path"] == str(out / "tune" / "all_train") and valid["data_path"] == str(out / "tune" / "all_test")
    assert tr["vocab_path"] == valid["vocab_path"] == str(out / "tune" / "vocab.txt")
    assert tr["batch_size"] == entry(config, "dataset", "dataset_train")["batch_size"]
    assert entry(config, "phase", "phase_train_tr")["dataset_name"] == "dataset_train_tr"
    runner = entry(config, "runner", "tune_runner")
    assert runner["phases"] == ["phase_train_tr"] and runner["eval_phase"] == "phase_train_valid"
    assert runner["search_space"].endswith("configs/tune_space_xe.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    loaded = load_config(str(path), ["mode=tune_runner"], check_files=False)
    assert loaded.runners["tune_runner"]["study_path"] == str(out / "output" / "tune" / "study.db")
    tune.read_search_space(loaded.runners["tune_runner"]["search_space"], model.HYPER_PARAMETERS, "k")

    (out / "tune" / "vocab.txt").unlink()  # no tuning split: no tuning entries
    config = text2paddle.make_config(repo_config, str(out), REPO)
    assert "tune_runner" not in [r["name"] for r in config["runner"]]


@pytest.mark.parametrize("name", ["tune_space_xe.yaml", "tune_space_bprmax.yaml"])
def test_shipped_search_spaces_parse(name):
    space = tune.read_search_space(os.path.join(REPO, "configs", name), model.HYPER_PARAMETERS, "k")
    assert {"layers", "batch_size", "optimizer.learning_rate"} <= {d.name for d in space}


def test_data_prepare_converts_the_tuning_split_of_the_100k_sample(tmp_path):
    from .helpers import RSC15_100K

    if not os.path.isdir(RSC15_100K):
        pytest.skip(f"the RSC15 100k sample is not at {RSC15_100K}")
    out = tmp_path / "out"
    import subprocess

    proc = subprocess.run(["sh", os.path.join(REPO, "data_prepare.sh"), "--prepared", RSC15_100K, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # SOURCE.txt of the sample: train_tr 53,254 clicks in 13,629 sessions on 2,873 items; train_valid 16,539 in 4,084
    vocab = (out / "tune" / "vocab.txt").read_text().split()
    train = (out / "tune" / "all_train" / "train.txt").read_text().splitlines()
    valid = (out / "tune" / "all_test" / "test.txt").read_text().splitlines()
    assert len(vocab) == 2873 and len(train) == 13629 and sum(len(s.split()) for s in train) == 53254
    assert len(valid) == 4084 and sum(len(s.split()) for s in valid) == 16539
    assert {int(i) for s in train for i in s.split()} == set(range(len(vocab)))
    config = load_config(str(out / "config.yaml"), ["mode=tune_runner"])
    assert config.datasets["dataset_train_tr"]["data_path"] == str(out / "tune" / "all_train")
    assert config.runners["tune_runner"]["best_config_path"] == str(out / "output" / "tune" / "best.yaml")
    assert tune.best_mode(config, "tune_runner") == ["cpu_train_runner", "cpu_infer_runner"]
