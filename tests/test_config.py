"""Config loading, `{workspace}`, `-o` overrides and every validation error (issue 2).

Most cases call paddlerec.config.load_config or paddlerec.run.main in this process (a
subprocess costs seconds of Paddle import); tests/test_bad_input.py runs the same kinds
of mistakes through `python -m paddlerec.run` end to end.
"""

import copy
import os

import pytest

from paddlerec import docs
from paddlerec.config import load_config
from paddlerec.errors import ConfigError
from paddlerec.run import main
from tests.helpers import REPO, base_config, entry, make_workspace, run_paddlerec, write_config

README = os.path.join(REPO, "README.md")


@pytest.fixture
def workspace(tmp_path):
    """A folder with data, vocab and config.yaml; returns (folder, config path)."""
    return tmp_path, make_workspace(tmp_path, vocab=True)


def config_error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(str(path), overrides)
    return info.value


def edited(folder, change, name="edited.yaml"):
    """Write a copy of the workspace config with `change(config_dict)` applied; returns its path."""
    config = base_config(vocab=True)
    change(config)
    return write_config(folder, config, name)


# ---- loading ---------------------------------------------------------------------------------

def test_file_and_folder_load_the_same_config(workspace):
    folder, path = workspace
    by_file, by_folder = load_config(path), load_config(str(folder))
    assert by_file.path == by_folder.path == os.path.join(str(folder), "config.yaml")
    assert by_file.runners == by_folder.runners and by_file.datasets == by_folder.datasets
    assert by_file.mode == ["train"]


def test_a_folder_without_config_yaml_says_so(tmp_path):
    error = config_error(tmp_path)
    assert error.key == "-m" and "config.yaml" in str(error)
    error = config_error(tmp_path / "nothing.yaml")
    assert error.key == "-m" and "nothing.yaml" in str(error)


def test_relative_workspace_is_relative_to_the_config_file_not_the_cwd(tmp_path, monkeypatch):
    project = tmp_path / "project"
    make_workspace(project / "ws", vocab=True)  # data and vocab live under project/ws
    config = base_config(vocab=True)
    config["workspace"] = "ws"
    entry(config, "runner", "train")["save_checkpoint_path"] = "out/ckpt"  # no {workspace}: relative to it too
    path = write_config(project, config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    loaded = load_config(os.path.relpath(path))
    ws = str(project / "ws")
    assert loaded.workspace == ws
    assert loaded.datasets["train_data"]["data_path"] == os.path.join(ws, "data", "train")
    assert loaded.datasets["train_data"]["vocab_path"] == os.path.join(ws, "vocab.txt")
    assert loaded.runners["train"]["save_checkpoint_path"] == os.path.join(ws, "out", "ckpt")
    assert loaded.runners["infer"]["predictions_path"] == os.path.join(ws, "pred")
    # absolute paths stay as they are
    assert loaded.phases["phase_train"]["model"] == os.path.join(REPO, "model.py")


def test_absolute_workspace_and_workspace_in_overrides(tmp_path):
    data_home = tmp_path / "data_home"
    make_workspace(data_home, vocab=True)
    config = base_config(vocab=True)
    config["workspace"] = str(data_home)
    path = write_config(tmp_path / "configs", config)
    # unquoted, YAML would read {workspace}/... as a mapping; the override takes it as the path it means
    loaded = load_config(path, ["runner.train.save_checkpoint_path={workspace}/elsewhere",
                                'runner.infer.predictions_path="{workspace}/quoted"'])
    assert loaded.datasets["test_data"]["data_path"] == str(data_home / "data" / "test")
    assert loaded.runners["train"]["save_checkpoint_path"] == str(data_home / "elsewhere")
    assert loaded.runners["infer"]["predictions_path"] == str(data_home / "quoted")


def test_shipped_config_loads_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_config(os.path.join(REPO, "config.yaml"))
    assert loaded.workspace == REPO
    assert loaded.datasets["dataset_train"]["data_path"] == os.path.join(REPO, "data", "train")


# ---- -o overrides ----------------------------------------------------------------------------

def test_overrides_reach_every_kind_of_key(workspace):
    _, path = workspace
    loaded = load_config(path, [
        "runner.train.epochs=5",  # a list entry, by name
        "dataset.train_data.batch_size=3",
        "hyper_parameters.optimizer.learning_rate=0.5",  # nested mapping
        "hyper_parameters.layers=[4, 3]",  # YAML list
        "hyper_parameters.dropout_embed=0.25",  # a key the file does not set
        "runner.infer.cutoffs=[1, 2]",
        "runner.train.eval_phase=phase_test",  # an optional runner key the file does not set
        "runner.train.save_checkpoint_path=/tmp/with=sign",  # only the first '=' separates
        "runner.infer.predictions_path=",  # empty value: empty string
        "mode=[train, infer]",
    ])
    assert loaded.runners["train"]["epochs"] == 5
    assert loaded.datasets["train_data"]["batch_size"] == 3
    assert loaded.hyper_parameters["optimizer"] == {"class": "adagrad", "learning_rate": 0.5, "momentum": 0.2}
    assert loaded.hyper_parameters["layers"] == [4, 3]
    assert loaded.hyper_parameters["dropout_embed"] == 0.25
    assert loaded.runners["infer"]["cutoffs"] == [1, 2]
    assert loaded.runners["train"]["eval_phase"] == "phase_test"
    assert loaded.runners["train"]["save_checkpoint_path"] == "/tmp/with=sign"
    assert loaded.runners["infer"]["predictions_path"] == ""
    assert loaded.mode == ["train", "infer"]
    assert load_config(path, ["mode=infer"]).mode == ["infer"]  # one name is a list of one


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; a learning rate written so must still be a number."""
    make_workspace(tmp_path, vocab=True)
    config = base_config(vocab=True)
    config["hyper_parameters"]["optimizer"]["learning_rate"] = "LEARNING_RATE"
    path = write_config(tmp_path, config)
    with open(path) as f:
        text = f.read().replace("LEARNING_RATE", "1e-3")
    with open(path, "w") as f:
        f.write(text)
    assert load_config(path).hyper_parameters["optimizer"]["learning_rate"] == 0.001
    loaded = load_config(path, ["hyper_parameters.optimizer.learning_rate=2E+2", "hyper_parameters.bpreg=-1.5e0"])
    assert loaded.hyper_parameters["optimizer"]["learning_rate"] == 200.0
    assert loaded.hyper_parameters["bpreg"] == -1.5
    assert load_config(path, ["runner.infer.predictions_path=e5"]).runners["infer"]["predictions_path"].endswith("e5")


def test_later_overrides_win(workspace):
    _, path = workspace
    assert load_config(path, ["runner.train.epochs=5", "runner.train.epochs=7"]).runners["train"]["epochs"] == 7


@pytest.mark.parametrize("override, key, fragments", [
    ("runner.nosuch.epochs=1", "runner.nosuch", ["no runner entry named 'nosuch'", "train, resume, infer"]),
    ("dataset.nosuch.batch_size=1", "dataset.nosuch", ["train_data, test_data"]),
    ("runner.train.epoch=1", "runner.train.epoch", ["unknown key", "did you mean 'epochs'"]),
    ("runners.train.epochs=1", "runners", ["did you mean 'runner'"]),
    ("hyper_parameters.optimizer.learning_rate.x=1", "hyper_parameters.optimizer.learning_rate.x", ["holds a value"]),
    ("runner.train=1", "runner.train", ["runner.<name>.<key>"]),
    ("runner.train.epochs", "-o", ["not KEY=VALUE"]),
    ("runner..epochs=1", "-o", ["empty key"]),
    ("runner.train.epochs=[1", "runner.train.epochs", ["not valid YAML"]),
    ("runner.train.epochs=two", "runner.train.epochs", ["expected an int", "'two'"]),
])
def test_bad_overrides_name_the_key(workspace, override, key, fragments):
    _, path = workspace
    error = config_error(path, [override])
    assert error.key == key, str(error)
    for fragment in fragments:
        assert fragment in str(error)


# ---- validation errors -----------------------------------------------------------------------

def _set(section, name, key, value):
    def change(config):
        entry(config, section, name)[key] = value
    return change


def _top(key, value):
    def change(config):
        config[key] = value
    return change


def _delete(section, name, key):
    def change(config):
        del entry(config, section, name)[key]
    return change


def _hp(key, value):
    def change(config):
        config["hyper_parameters"][key] = value
    return change


def _duplicate_runner(config):
    config["runner"].append(copy.deepcopy(entry(config, "runner", "train")))


VALIDATION_CASES = {
    # name: (change, dotted key, fragments of the message)
    "unknown top-level key": (_top("runers", []), "runers", ["did you mean 'runner'"]),
    "unknown dataset key": (_set("dataset", "train_data", "batch", 8), "dataset.train_data.batch",
                            ["unknown key", "batch_size"]),
    "unknown phase key": (_set("phase", "phase_train", "modle", "x"), "phase.phase_train.modle", ["model"]),
    "unknown runner key": (_set("runner", "train", "save_path", "x"), "runner.train.save_path",
                           ["allowed here:", "save_checkpoint_path"]),
    "infer key in a train runner": (_set("runner", "train", "cutoffs", [1]), "runner.train.cutoffs",
                                    ["unknown key"]),
    "int as a string": (_set("dataset", "train_data", "batch_size", "8"), "dataset.train_data.batch_size",
                        ["expected an int", "'8'"]),
    "float for an int": (_set("runner", "train", "epochs", 1.5), "runner.train.epochs", ["expected an int"]),
    "bool for an int": (_set("runner", "train", "epochs", True), "runner.train.epochs", ["expected an int"]),
    "below the minimum": (_set("dataset", "train_data", "batch_size", 0), "dataset.train_data.batch_size",
                          [">= 1"]),
    "not a choice": (_set("runner", "train", "device", "tpu"), "runner.train.device", ["'tpu'", "cpu, gpu"]),
    "list element": (_set("runner", "infer", "cutoffs", [1, "x"]), "runner.infer.cutoffs[1]", ["expected an int"]),
    "path not a string": (_set("runner", "train", "save_checkpoint_path", 3), "runner.train.save_checkpoint_path",
                          ["expected a path"]),
    "required key missing": (_delete("dataset", "train_data", "batch_size"), "dataset.train_data.batch_size",
                             ["missing"]),
    "runner without class": (_delete("runner", "train", "class"), "runner.train.class", ["train, infer"]),
    "unknown runner class": (_set("runner", "train", "class", "evaluate"), "runner.train.class",
                             ["'evaluate'", "train, infer"]),
    "mode names no runner": (_top("mode", ["train", "tain"]), "mode", ["no runner named 'tain'", "train, resume"]),
    "mode empty": (_top("mode", []), "mode", ["empty"]),
    "mode not names": (_top("mode", 3), "mode", ["expected a name or a list of names"]),
    "phase names no dataset": (_set("phase", "phase_train", "dataset_name", "train"), "phase.phase_train.dataset_name",
                               ["no dataset named 'train'", "train_data, test_data"]),
    "runner names no phase": (_set("runner", "train", "phases", ["phase_trian"]), "runner.train.phases",
                              ["no phase named 'phase_trian'"]),
    "train runner with two phases": (_set("runner", "train", "phases", ["phase_train", "phase_test"]),
                                     "runner.train.phases", ["exactly one phase"]),
    "runner without phases": (_set("runner", "train", "phases", []), "runner.train.phases", ["empty"]),
    "eval phase unknown": (_set("runner", "train", "eval_phase", "phase_val"), "runner.train.eval_phase",
                           ["no phase named 'phase_val'"]),
    "export without a folder": (_set("runner", "train", "save_inference_interval", 1),
                                "runner.train.save_inference_path", ["missing", "save_inference_interval is 1"]),
    "missing model file": (_set("phase", "phase_train", "model", "{workspace}/modle.py"), "phase.phase_train.model",
                           ["model file not found", "modle.py"]),
    "missing reader file": (_set("dataset", "train_data", "data_converter", "{workspace}/reader.py"),
                            "dataset.train_data.data_converter", ["reader file not found"]),
    "missing data path": (_set("dataset", "train_data", "data_path", "{workspace}/data/trian"),
                          "dataset.train_data.data_path", ["data/trian", "data_prepare.sh"]),
    "missing vocab": (_set("dataset", "train_data", "vocab_path", "{workspace}/vocab2.txt"),
                      "dataset.train_data.vocab_path", ["vocab2.txt", "text2paddle.py"]),
    "dataset not a list": (_top("dataset", {"name": "x"}), "dataset", ["expected a list"]),
    "entry without a name": (lambda c: c["phase"].append({"model": "x"}), "phase[2].name", ["missing"]),
    "two entries of one name": (_duplicate_runner, "runner.train", ["more than one entry"]),
    "hyper_parameters not a mapping": (_top("hyper_parameters", [1]), "hyper_parameters", ["mapping"]),
}


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_validation_error_names_the_dotted_key(tmp_path, case):
    make_workspace(tmp_path, vocab=True)
    change, key, fragments = VALIDATION_CASES[case]
    error = config_error(edited(tmp_path, change))
    assert error.key == key, str(error)
    assert str(error).startswith(f"{key}: ")
    for fragment in fragments:
        assert fragment in str(error), str(error)


def test_files_of_runners_not_in_mode_are_not_required(tmp_path):
    make_workspace(tmp_path, vocab=True)
    # the infer phase's data is missing, but mode runs only the train runner
    path = edited(tmp_path, _set("dataset", "test_data", "data_path", "{workspace}/nothing"))
    assert load_config(path).mode == ["train"]
    assert config_error(path, ["mode=[train, infer]"]).key == "dataset.test_data.data_path"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("workspace: .\nmode: [train\nrunner: []\n")
    error = config_error(path)
    assert f"{path}:3" in str(error) or f"{path}:2" in str(error)
    assert "YAML syntax error" in str(error)


def test_config_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- just\n- a list\n")
    assert "must be a mapping" in str(config_error(path))


# ---- through paddlerec.run.main: exit code 2 and one line ------------------------------------

def _stderr_error_lines(err):
    return [line for line in err.splitlines() if "error: " in line]


@pytest.mark.parametrize("overrides, key, fragments", [
    (["runner.train.epoch=1"], "runner.train.epoch", ["did you mean 'epochs'"]),
    (["mode=[training]"], "mode", ["no runner named 'training'"]),
    (["phase.phase_train.dataset_name=nothing"], "phase.phase_train.dataset_name", ["no dataset named"]),
    # hyper-parameters are checked against the model file's declaration, still before any work
    (["hyper_parameters.hid_size=100"], "hyper_parameters.hid_size", ["unknown key", "layers: [100]"]),
    (["hyper_parameters.optimizer.learning_rate=fast"], "hyper_parameters.optimizer.learning_rate",
     ["expected a number"]),
    (["hyper_parameters.loss=mse"], "hyper_parameters.loss", ["'mse'", "cross-entropy"]),
    (["hyper_parameters.optimizer.learning_rate=0"], "hyper_parameters.optimizer.learning_rate", ["> 0.0"]),
])
def test_main_exits_2_with_one_line(workspace, capsys, overrides, key, fragments):
    folder, path = workspace
    args = ["-m", path, "--no-progress"]
    for text in overrides:
        args += ["-o", text]
    assert main(args) == 2
    lines = _stderr_error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key}: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    assert not os.path.exists(folder / "ckpt")  # nothing was trained or written


def test_gpu_device_on_a_build_without_cuda(workspace):
    paddle = pytest.importorskip("paddle")
    if paddle.is_compiled_with_cuda():
        pytest.skip("this paddlepaddle has CUDA: device gpu is valid here")
    folder, path = workspace
    # end to end, as a user meets it (the check needs Paddle, so it runs after the import)
    proc = run_paddlerec(["-m", path, "-o", "runner.train.device=gpu"])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = _stderr_error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("config error: runner.train.device: ")
    assert "install the GPU build of paddlepaddle" in lines[0] and "device: cpu" in lines[0]
    assert not os.path.exists(folder / "ckpt")


def test_gpu_runner_later_in_mode_stops_before_any_training(workspace, capsys):
    paddle = pytest.importorskip("paddle")
    if paddle.is_compiled_with_cuda():
        pytest.skip("this paddlepaddle has CUDA: device gpu is valid here")
    folder, path = workspace
    assert main(["-m", path, "--no-progress", "-o", "mode=[train, infer]", "-o", "runner.infer.device=gpu"]) == 2
    assert _stderr_error_lines(capsys.readouterr().err)[0].startswith("config error: runner.infer.device: ")
    assert not os.path.exists(folder / "ckpt")


# ---- README's config reference ---------------------------------------------------------------

def test_a_bar_in_a_help_text_does_not_split_its_row():
    from paddlerec.params import Param, reference_table

    row = reference_table([Param("device", "str", "cpu", help="cpu | gpu")]).splitlines()[2]
    assert row.replace("\\|", "").count("|") == 5, row  # four cells
    assert "cpu \\| gpu" in row


def test_reference_refuses_an_undescribed_top_level_key(monkeypatch):
    rows = dict(docs.TOP_LEVEL_ROWS)
    del rows["mode"]
    monkeypatch.setattr(docs, "TOP_LEVEL_ROWS", rows)
    with pytest.raises(docs.DocsError, match="mode"):
        docs.config_reference_markdown()


def test_docs_update_rewrites_only_the_marked_section(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{docs.START}\nold table\n{docs.END}\n\nafter\n")
    assert docs.main(["--update", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert docs.readme_section(text) == docs.config_reference_markdown()
    assert docs.main(["--update", str(readme)]) == 0
    assert "already up to date" in capsys.readouterr().out
    readme.write_text("no markers\n")
    assert docs.main(["--update", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err


def test_readme_config_reference_matches_the_declarations():
    if not os.path.isfile(README):
        pytest.skip("README.md is not written yet")
    with open(README, encoding="utf-8") as f:
        section = docs.readme_section(f.read())
    if section is None:
        pytest.skip(f"README.md has no {docs.START} / {docs.END} markers yet")
    expected = docs.config_reference_markdown()
    assert section == expected, ("README.md's config reference differs from the declarations; "
                                 "run `python -m paddlerec.docs --update README.md`")


def test_thread_num_zero_means_every_core_this_process_may_use():
    from paddlerec.config import cpu_threads

    assert cpu_threads(3) == 3
    assert cpu_threads(0) == len(os.sched_getaffinity(0))
