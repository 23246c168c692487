"""The inference export (paddlerec/export.py): io.json describes it, the README's
paddle.inference snippet runs on it, damaged copies are refused, and the optional ONNX
conversion gives paddle.inference's top-K under onnxruntime."""

import json
import os
import re
import subprocess

import numpy as np
import pytest

from tests.helpers import PYTHON, REPO, make_model, random_sessions, run_cli

N_ITEMS = 60


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-layer model of random sessions (the last 4 ids never clicked) exported with a vocab and a
    training description."""
    from paddlerec import export
    from paddlerec.contract import DataInfo

    sessions = random_sessions(300, N_ITEMS - 4, seed=11)
    model = make_model(sessions, n_items=N_ITEMS, layers=[12, 8])
    labels = [f"item-{3 * i + 1}" for i in range(N_ITEMS)]
    data = DataInfo(n_items=N_ITEMS, item_support=np.bincount(sessions.items, minlength=N_ITEMS), labels=labels)
    root = tmp_path_factory.mktemp("export")
    folder = export.write_export(str(root), 3, model, 7, labels, training={"hyper_parameters": {"layers": [12, 8]}},
                                 data=data)
    return dict(folder=folder, model=model, labels=labels, data=data, sessions=sessions)


def test_io_json_describes_the_export(exported):
    from paddlerec import export

    with open(os.path.join(exported["folder"], "io.json")) as f:
        io = json.load(f)
    assert (io["format"], io["epoch"], io["n_items"], io["topk"], io["hidden_size"]) == (export.FORMAT, 3, N_ITEMS, 7, 20)
    assert io["layers"] == [12, 8] and io["padding_id"] == N_ITEMS and io["vocab"] == "vocab.txt"
    assert io["unseen_items"] == [N_ITEMS - 4, N_ITEMS - 3, N_ITEMS - 2, N_ITEMS - 1]
    specs = {spec["name"]: (spec["dtype"], spec["shape"]) for spec in io["inputs"] + io["outputs"]}
    assert [spec["name"] for spec in io["inputs"]] == ["item_ids", "hidden", "exclude_ids"]
    assert [spec["name"] for spec in io["outputs"]] == ["topk_ids", "topk_scores", "next_hidden"]
    assert specs == {"item_ids": ("int64", [-1]), "hidden": ("float32", [-1, 20]), "exclude_ids": ("int64", [-1, -1]),
                     "topk_ids": ("int64", [-1, 7]), "topk_scores": ("float32", [-1, 7]),
                     "next_hidden": ("float32", [-1, 20])}
    assert all(spec["meaning"] for spec in io["inputs"] + io["outputs"])
    assert "zeros [1, hidden_size] float32" in io["initial_state"]
    assert io["training"] == {"hyper_parameters": {"layers": [12, 8]}}
    support = exported["data"].item_support
    assert io["data"]["events"] == int(support.sum()) and io["data"]["items_clicked"] == N_ITEMS - 4
    assert re.fullmatch(r"[0-9a-f]{64}", io["data"]["sha256"])
    assert sorted(io["files"]) == ["model.json", "model.pdiparams", "vocab.txt"]
    for name, listed in io["files"].items():
        assert listed == export.file_digest(os.path.join(exported["folder"], name))
    # the same data gives the same fingerprint; other data another
    assert export.data_fingerprint(exported["data"]) == io["data"]
    other = exported["data"].__class__(n_items=N_ITEMS, item_support=support + 1, labels=exported["labels"])
    assert export.data_fingerprint(other)["sha256"] != io["data"]["sha256"]


def test_the_export_command_checks_and_describes(exported, tmp_path):
    done = run_cli(["-m", "paddlerec.export", exported["folder"]], timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{exported['folder']}: epoch 3, {N_ITEMS} items ({N_ITEMS - 4} servable), top-7, hidden 20" in done.stdout
    assert re.search(r"input\s+exclude_ids\s+int64\s+\[-1, -1\]", done.stdout)
    import shutil

    copy = tmp_path / "3"
    shutil.copytree(exported["folder"], copy)
    with open(copy / "vocab.txt", "a") as f:
        f.write("extra\n")
    done = run_cli(["-m", "paddlerec.export", str(copy)], timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"checkpoint error: {copy / 'vocab.txt'}: {os.path.getsize(copy / 'vocab.txt')} bytes, io.json says "
        f"{os.path.getsize(copy / 'vocab.txt') - 6}; the export is damaged or incomplete (copy it again, or export "
        f"the model again)"]


def readme_snippet():
    """The README's paddle.inference example: the python block after its marker comment."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- paddle\.inference example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its paddle.inference example"
    return match.group(1)


def test_the_readme_paddle_inference_snippet_runs(exported, tmp_path):
    """The snippet, pointed at this export, steps a session and prints its top-K, which never
    holds the session's clicks (it excludes them) and equals what the server answers."""
    code = readme_snippet()
    assert 'folder = "output/inference/10"' in code
    code = code.replace('folder = "output/inference/10"', f"folder = {exported['folder']!r}")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    done = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env=dict(os.environ, GLOG_minloglevel="2"))
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(printed) == 2, done.stdout

    from paddlerec import export
    from paddlerec.serve import Model, Recommender
    from tests.test_serve import runner_keys

    labels = exported["labels"]
    service = Recommender(Model(export.read_export(exported["folder"]), 1, "cpu"),
                          runner_keys(topk=7, exclude_seen=True), "runner.t")
    answers = [service.click({"session": "s", "item": labels[i]}) for i in (0, 1)]
    service.close()
    for line, answer in zip(printed, answers):
        items = re.findall(r"'([^']+)'", line.split("]")[0])
        assert items == answer["items"]
    assert not {labels[0], labels[1]} & set(items)


@pytest.fixture(scope="module")
def onnx_export(exported):
    pytest.importorskip("paddle2onnx", reason="the optional ONNX extra is not installed "
                                              "(pip install -r requirements-onnx.txt)")
    pytest.importorskip("onnxruntime", reason="the optional ONNX extra is not installed "
                                              "(pip install -r requirements-onnx.txt)")
    from paddlerec import export

    done = run_cli(["-m", "paddlerec.export", exported["folder"], "--onnx"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {os.path.join(exported['folder'], 'model.onnx')}" in done.stdout
    return export.read_export(exported["folder"])  # io.json now lists model.onnx with its sha256


def test_onnx_topk_equals_paddle_inference_on_1000_sessions(exported, onnx_export):
    """1,000 random sessions stepped click by click, all side by side, through paddle.inference and
    onnxruntime, half of them excluding their clicks: the same top-K ids after every click (the
    order of scores equal to float precision aside), the same scores and states."""
    import onnxruntime

    from paddlerec.serve import Model

    info = onnx_export
    assert info.io["onnx"]["file"] == "model.onnx" and "model.onnx" in info.io["files"]
    paddle_model = Model(info, 1, "cpu")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(info.path("model.onnx"), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["item_ids", "hidden", "exclude_ids"]
    assert [o.name for o in session.get_outputs()] == ["topk_ids", "topk_scores", "next_hidden"]

    seed = 12
    rng = np.random.default_rng(seed)
    clickable = np.flatnonzero(info.known)
    sessions = [rng.choice(clickable, rng.integers(1, 9)) for _ in range(1000)]
    hidden_p = np.zeros((1000, info.hidden_size), np.float32)
    hidden_o = hidden_p.copy()
    seen = [[] for _ in sessions]
    compared = swapped = 0
    for t in range(max(map(len, sessions))):
        rows = [s for s, clicks in enumerate(sessions) if len(clicks) > t]
        items = np.array([sessions[s][t] for s in rows], np.int64)
        for s, item in zip(rows, items):
            seen[s].append(int(item))
        width = max(len(seen[s]) for s in rows)
        exclude = np.full((len(rows), width), info.padding_id, np.int64)
        for j, s in enumerate(rows):
            if s % 2:
                exclude[j, :len(seen[s])] = seen[s]
        ids_p, scores_p, next_p = paddle_model.step(items, hidden_p[rows], exclude)
        ids_o, scores_o, next_o = session.run(None, {"item_ids": items, "hidden": hidden_o[rows], "exclude_ids": exclude})
        np.testing.assert_allclose(scores_o, scores_p, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}, click {t}")
        np.testing.assert_allclose(next_o, next_p, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}, click {t}")
        for j in range(len(rows)):
            compared += 1
            if not np.array_equal(ids_o[j], ids_p[j]):
                # only items whose scores tie to float precision may trade places
                differ = ids_o[j] != ids_p[j]
                assert set(ids_o[j]) == set(ids_p[j]) or np.isclose(scores_p[j][-1], scores_p[j][-2], atol=1e-5), \
                    f"seed {seed}, click {t}, row {j}: onnx {ids_o[j]} paddle {ids_p[j]}"
                assert np.allclose(scores_p[j][differ], scores_o[j][differ], atol=1e-5)
                swapped += 1
        hidden_p[rows], hidden_o[rows] = next_p, next_o
    assert compared == sum(map(len, sessions)) and swapped <= compared // 100, (swapped, compared)
