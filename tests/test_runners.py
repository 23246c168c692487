"""The runners end to end (issue 2): a one-epoch run of config.yaml, incremental training,
infer over several checkpoints, and the exported inference model against the trained one.

Runs happen in this process through paddlerec.run.main (cheap) except the run of the
shipped config.yaml, which goes through `python -m paddlerec.run` as a user types it.
"""

import json
import logging
import os
import re

import numpy as np
import pytest

from paddlerec import checkpoint, runners
from paddlerec.loops import RunContext, build_model
from paddlerec.mode import prepare
from paddlerec.config import load_config
from paddlerec.run import main
from tests.helpers import N_ITEMS, REPO, checkpoint_epochs, labels, leftovers, make_workspace, run_paddlerec

paddle = pytest.importorskip("paddle")


def run_main(path, *overrides):
    args = ["-m", str(path), "--no-progress"]
    for text in overrides:
        args += ["-o", text]
    return main(args)


def read_predictions(path):
    """{session: (items, scores)} of a predictions file, checking its shape on the way."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "session\titems\tscores"
    rows = {}
    for line in lines[1:]:
        session, items, scores = line.split("\t")
        rows[int(session)] = (items.split(), [float(s) for s in scores.split()])
    assert list(rows) == sorted(rows)  # written in session order
    return rows


@pytest.mark.slow
def test_one_epoch_of_the_shipped_config(tmp_path):
    """README's first command, shortened to one epoch, with every output redirected to tmp."""
    out = tmp_path / "out"
    proc = run_paddlerec(["-m", os.path.join(REPO, "config.yaml"),
                    "-o", "runner.cpu_train_runner.epochs=1",
                    "-o", f"runner.cpu_train_runner.save_checkpoint_path={out}/checkpoints",
                    "-o", f"runner.cpu_train_runner.save_inference_path={out}/inference",
                    "-o", f"runner.cpu_infer_runner.init_model_path={out}/checkpoints",
                    "-o", f"runner.cpu_infer_runner.predictions_path={out}/predictions",
                    "-o", f"runner.cpu_infer_runner.metrics_path={out}"],
                   cwd=str(tmp_path))  # not the repository: the config's relative workspace must hold
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    log, results = proc.stderr, proc.stdout
    assert re.search(r"epoch 1 done, use time: [\d.]+s, global metrics: loss [\d.]+, events \d+", log)
    assert "epoch 2" not in log
    assert re.search(r"infer phase_infer, epoch 1 .*Recall@20: [\d.]+.*MRR@20: [\d.]+", log)
    # results on stdout, the log on stderr
    assert re.search(r"session: \d+, top 20 items: \[\d+(, \d+){19}\]", results)
    assert "session: " not in log and " INFO " not in results
    assert re.search(r"GRU4Rec, epoch 1 +[\d.]+ +[\d.]+", results)
    assert re.search(r"POP \(baseline\) +[\d.]+ +[\d.]+", results)
    assert "Outputs:" in results and "curl -s localhost:8866/click" in results

    assert checkpoint_epochs(out / "checkpoints") == [1]
    meta = json.loads((out / "checkpoints" / "1" / "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["hyper_parameters"]["layers"] == [100]
    with open(os.path.join(REPO, "data", "train", "sessions.txt")) as f:
        assert meta["data"]["n_items"] == max(int(t) for line in f for t in line.split()) + 1
    assert sorted(os.listdir(out / "inference" / "1")) == ["io.json", "model.json", "model.pdiparams"]
    assert sorted(os.listdir(out / "predictions")) == ["1.txt"]
    assert read_predictions(out / "predictions" / "1.txt")
    assert not leftovers(out / "checkpoints") and not leftovers(out / "inference")


# ---- incremental training --------------------------------------------------------------------

def _arrays(state):
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}


def _assert_same(actual, expected, skip=()):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        if key in skip:
            continue
        assert actual[key].dtype == expected[key].dtype, key
        assert np.array_equal(actual[key], expected[key]), f"{key} differs"


def test_incremental_training_restores_weights_and_optimizer_exactly(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = make_workspace(tmp_path)
    config = load_config(path)
    ctx = RunContext(config, show_progress=False)
    prepare(ctx)
    trained = runners.run_train(ctx, "train")  # epochs 1, 2; checkpoints 1 and 2
    ckpt = os.path.join(str(tmp_path), "ckpt", "2")
    saved_net = _arrays(paddle.load(os.path.join(ckpt, "model.pdparams")))
    saved_opt = _arrays(paddle.load(os.path.join(ckpt, "optimizer.pdopt")))
    _assert_same(saved_net, _arrays(trained.network.state_dict()))
    _assert_same(saved_opt, _arrays(trained.optimizer_state()))

    # a new run's restore, as the `resume` runner (init_model_path: the parent folder) does it
    ctx2 = RunContext(load_config(path), show_progress=False)
    hparams = ctx2.hyper_parameters("phase_train")
    data = ctx2.reader("phase_train").info()
    fresh = build_model(ctx2, "phase_train", hparams, data)
    restored, epoch, run_id = runners.restore_for_training(ctx2, "resume", "phase_train", hparams, data)
    assert epoch == 2
    # a continued run keeps the id of the run it continues
    with open(os.path.join(ckpt, "meta.json")) as f:
        assert run_id == json.load(f)["run_id"]
    restored_net = _arrays(restored.network.state_dict())
    restored_opt = _arrays(restored.optimizer_state())
    _assert_same(restored_net, saved_net)
    _assert_same(restored_opt, saved_opt)
    # training on: the items known before stay known, the new data's items join them
    restored.begin_epoch(3, True)
    known = restored.network.item_support.numpy()
    assert np.array_equal(known, np.maximum(saved_net["item_support"], data.item_support))
    # and the restore did something: a fresh model differs in weights and optimizer state
    fresh_net, fresh_opt = _arrays(fresh.network.state_dict()), _arrays(fresh.optimizer_state())
    assert not np.array_equal(fresh_net["item_emb"], restored_net["item_emb"])
    assert any(not np.array_equal(fresh_opt[k], restored_opt[k]) for k in fresh_opt)


def test_resumed_run_continues_the_epoch_numbering(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = make_workspace(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert run_main(path, "runner.train.save_checkpoint_interval=0") == 0  # only after the last epoch
    assert checkpoint_epochs(ckpt) == [2]
    caplog.clear()

    assert run_main(path, "mode=resume", "runner.resume.epochs=3") == 0
    assert checkpoint_epochs(ckpt) == [2, 3, 4, 5]
    text = caplog.text
    assert f"continuing from {ckpt / '2'} (epoch 2)" in text
    done = [int(n) for n in re.findall(r"epoch (\d+) done", text)]
    assert done == [3, 4, 5]
    for epoch in (3, 4, 5):
        assert json.loads((ckpt / str(epoch) / "meta.json").read_text())["epoch"] == epoch
    history = json.loads((ckpt / "curves.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]

    # naming one checkpoint folder (not the newest) continues from that one
    caplog.clear()
    assert run_main(path, "mode=resume", f"runner.resume.init_model_path={ckpt / '3'}", "runner.resume.epochs=1",
                    f"runner.resume.save_checkpoint_path={tmp_path / 'branch'}") == 0
    assert checkpoint_epochs(tmp_path / "branch") == [4]
    assert f"continuing from {ckpt / '3'} (epoch 3)" in caplog.text


# ---- infer over several checkpoints, and the exported model ----------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Ten epochs with a vocab: checkpoints 3, 6, 9, 10; inference models 5 and 10."""
    folder = tmp_path_factory.mktemp("trained")
    path = make_workspace(folder, vocab=True)
    assert run_main(path, "runner.train.epochs=10", "runner.train.save_checkpoint_interval=3",
                    "runner.train.save_inference_interval=5", "runner.train.topk=5",
                    f"runner.train.save_inference_path={folder / 'inference'}") == 0
    return folder, path


def test_infer_evaluates_every_checkpoint_in_epoch_order(trained, caplog):
    folder, path = trained
    caplog.set_level(logging.INFO)
    pred = folder / "pred_all"
    assert run_main(path, "mode=infer", f"runner.infer.predictions_path={pred}") == 0
    order = [int(n) for n in re.findall(r"infer phase_test, epoch (\d+) ", caplog.text)]
    assert order == [3, 6, 9, 10]  # numeric order: "10" sorts before "3" as text
    assert sorted(os.listdir(pred)) == ["10.txt", "3.txt", "6.txt", "9.txt"]
    vocab = set(labels(N_ITEMS))
    with open(folder / "data" / "test" / "sessions.txt") as f:
        n_sessions = sum(1 for line in f if line.split())
    contents = {}
    for epoch in (3, 6, 9, 10):
        rows = read_predictions(pred / f"{epoch}.txt")
        assert sorted(rows) == list(range(n_sessions))
        for items, scores in rows.values():
            assert len(items) == 5 and len(set(items)) == 5
            assert set(items) <= vocab  # original item ids, not model ids
            assert scores == sorted(scores, reverse=True)
        contents[epoch] = rows
    assert contents[3] != contents[10]  # each file comes from its own checkpoint
    # the log shows a few sessions' recommendations with original ids too
    shown = re.findall(r"session: \d+, top 5 items: \[(.*)\]", caplog.text)
    assert shown and all(set(s.split(", ")) <= vocab for s in shown)

    caplog.clear()
    pred_one = folder / "pred_one"
    assert run_main(path, "mode=infer", f"runner.infer.init_model_path={folder / 'ckpt' / '6'}",
                    f"runner.infer.predictions_path={pred_one}") == 0
    assert os.listdir(pred_one) == ["6.txt"]
    assert read_predictions(pred_one / "6.txt") == contents[6]


def _predictor(folder):
    from paddle import inference

    config = inference.Config(str(folder / "model.json"), str(folder / "model.pdiparams"))
    config.disable_gpu()
    config.disable_glog_info()
    return inference.create_predictor(config)


def _predict(predictor, io, item_ids, hidden, exclude_ids=None):
    item_ids = np.asarray(item_ids, np.int64)
    if exclude_ids is None:  # one column of padding: nothing excluded
        exclude_ids = np.full((len(item_ids), 1), io["padding_id"], np.int64)
    values = (item_ids, np.asarray(hidden, np.float32), np.asarray(exclude_ids, np.int64))
    inputs = dict(zip([spec["name"] for spec in io["inputs"]], values))
    for name, value in inputs.items():
        handle = predictor.get_input_handle(name)
        handle.reshape(list(value.shape))
        handle.copy_from_cpu(value)
    predictor.run()
    return {spec["name"]: predictor.get_output_handle(spec["name"]).copy_to_cpu() for spec in io["outputs"]}


def test_exported_model_serves_the_trained_models_recommendations(trained):
    folder, path = trained
    export = folder / "inference" / "10"
    io = json.loads((export / "io.json").read_text())
    inputs, outputs = [spec["name"] for spec in io["inputs"]], [spec["name"] for spec in io["outputs"]]
    assert inputs == ["item_ids", "hidden", "exclude_ids"] and outputs == ["topk_ids", "topk_scores", "next_hidden"]
    predictor = _predictor(export)
    assert predictor.get_input_names() == inputs
    assert predictor.get_output_names() == outputs  # no fetch_name_N to guess
    vocab = (export / "vocab.txt").read_text().split("\n")[:-1]
    assert vocab == labels(N_ITEMS)

    # the trained model's (dygraph) recommendations after each whole test session
    pred = folder / "pred_export"
    assert run_main(path, "mode=infer", f"runner.infer.init_model_path={folder / 'ckpt' / '10'}",
                    f"runner.infer.predictions_path={pred}") == 0
    expected = read_predictions(pred / "10.txt")

    # the exported model fed the same sessions click by click, all sessions side by side
    with open(folder / "data" / "test" / "sessions.txt") as f:
        sessions = [[int(t) for t in line.split()] for line in f]
    hidden = np.zeros((len(sessions), io["hidden_size"]), np.float32)
    final = {}
    for t in range(max(map(len, sessions))):
        rows = [s for s, clicks in enumerate(sessions) if len(clicks) > t]
        out = _predict(predictor, io, [sessions[s][t] for s in rows], hidden[rows])
        hidden[rows] = out["next_hidden"]
        for i, s in enumerate(rows):
            if len(sessions[s]) == t + 1:
                final[s] = (out["topk_ids"][i], out["topk_scores"][i])
    assert sorted(final) == sorted(expected)
    for s, (ids, scores) in final.items():
        items, file_scores = expected[s]
        assert [vocab[i] for i in ids] == items, f"session {s}"
        np.testing.assert_allclose(scores, file_scores, rtol=1e-4, atol=1e-5)


def test_exported_model_matches_the_network_on_any_state(trained):
    """Random clicks and hidden states: the same top-K ids, scores and next state as the checkpoint's network."""
    folder, _ = trained
    export = folder / "inference" / "10"
    io = json.loads((export / "io.json").read_text())
    ckpt = str(folder / "ckpt" / "10")
    meta = checkpoint.read_meta(ckpt)
    import model as model_module
    from paddlerec.contract import DataInfo
    from paddlerec.params import validate_section

    hp = validate_section(meta["hyper_parameters"], model_module.HYPER_PARAMETERS, "hyper_parameters")
    model = model_module.Model(hp, DataInfo(n_items=meta["data"]["n_items"]))
    checkpoint.load_into(model, ckpt, with_optimizer=False)
    net = model.network
    rng = np.random.default_rng(5)
    items = rng.integers(0, io["n_items"], 17)
    hidden = rng.normal(0, 0.5, (17, io["hidden_size"])).astype(np.float32)
    out = _predict(_predictor(export), io, items, hidden)
    with paddle.no_grad():
        x, new_hidden = net.step(paddle.to_tensor(items), [paddle.to_tensor(hidden)])
        scores = net.all_scores(x) + net.score_mask()
        top_scores, top_ids = paddle.topk(scores, io["topk"], axis=1)
    np.testing.assert_array_equal(out["topk_ids"], top_ids.numpy())
    np.testing.assert_allclose(out["topk_scores"], top_scores.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["next_hidden"], new_hidden[0].numpy(), rtol=1e-5, atol=1e-6)

    # exclude_ids: each row drops its own items (padded with n_items) from the same scores' top-K
    n_items = io["n_items"]
    exclude = np.full((17, 4), n_items, np.int64)
    for row in range(17):
        count = rng.integers(0, 5)
        exclude[row, :count] = top_ids.numpy()[row, rng.permutation(io["topk"])[:count]]
    excluded = _predict(_predictor(export), io, items, hidden, exclude)
    masked = scores.numpy().copy()
    for row in range(17):
        masked[row, exclude[row][exclude[row] < n_items]] = -np.inf
    expected = np.argsort(-masked, axis=1, kind="stable")[:, :io["topk"]]
    np.testing.assert_array_equal(np.take_along_axis(masked, excluded["topk_ids"], 1),
                                  np.take_along_axis(masked, expected, 1))  # same scores, in order (ties aside)
    for row in range(17):
        assert not set(excluded["topk_ids"][row]) & set(exclude[row]), f"row {row} got an excluded item"


def test_a_new_run_does_not_mix_with_an_earlier_runs_checkpoints(tmp_path, caplog):
    """A fresh 2-epoch run into a folder where an earlier run left epochs 3..4: evaluating and
    resuming from the folder take the new run's checkpoints only, and both say so."""
    caplog.set_level(logging.INFO)
    path = make_workspace(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert run_main(path, "runner.train.epochs=4", "mode=train") == 0
    assert checkpoint_epochs(ckpt) == [1, 2, 3, 4]
    caplog.clear()
    assert run_main(path, "mode=[train, infer]") == 0  # a new run: epochs 1, 2 again
    assert checkpoint_epochs(ckpt) == [1, 2, 3, 4]
    text = caplog.text
    assert "already holds checkpoints (epochs 1, 2, 3, 4) of an earlier run" in text
    evaluated = re.findall(r"infer phase_test, epoch (\d+)", text)
    assert evaluated == ["1", "2"]
    assert "skipping checkpoint(s) 3, 4 left there by an earlier training run" in text
    caplog.clear()
    assert run_main(path, "mode=resume", "runner.resume.epochs=1") == 0
    assert re.search(r"continuing from \S+/2 \(epoch 2\)", caplog.text)
