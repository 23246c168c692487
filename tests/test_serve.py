"""The live-session server (paddlerec/serve.py): endpoints, state, eviction, bad requests,
and served top-K == the offline infer runner's top-K on a small model trained here."""

import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading

import numpy as np
import pytest

from tests.helpers import PYTHON, REPO, make_model, random_sessions, run_cli

CONFIG = os.path.join(REPO, "config.yaml")
EPOCHS = 2
TOPK = 10


def read_lines(path):
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer model trained on the sample sessions with a vocab of made-up original ids, its
    export, and the infer runner's top-K for every (training) session after its last click."""
    root = tmp_path_factory.mktemp("serve")
    sessions = read_lines(os.path.join(REPO, "data", "sample_paddlerec", "train", "small_train.txt"))
    n_items = max(int(i) for s in sessions for i in s) + 3  # the last ids are in the vocab, never clicked
    labels = [f"P{1000 + 7 * i}" for i in range(n_items)]
    os.makedirs(root / "data")
    with open(root / "data" / "sessions.txt", "w") as f:
        f.write("\n".join(" ".join(s) for s in sessions) + "\n")
    with open(root / "vocab.txt", "w") as f:
        f.write("\n".join(labels) + "\n")
    overrides = [
        f"dataset.dataset_train.data_path={root}/data", f"dataset.dataset_train.vocab_path={root}/vocab.txt",
        f"dataset.dataset_infer.data_path={root}/data", f"dataset.dataset_infer.vocab_path={root}/vocab.txt",
        "hyper_parameters.layers=[24, 16]", "hyper_parameters.n_sample=64",
        f"runner.cpu_train_runner.epochs={EPOCHS}", f"runner.cpu_train_runner.save_checkpoint_path={root}/ck",
        f"runner.cpu_train_runner.save_inference_path={root}/inference",
        f"runner.cpu_train_runner.save_inference_interval={EPOCHS}", f"runner.cpu_train_runner.topk={TOPK}",
        f"runner.cpu_infer_runner.init_model_path={root}/ck", f"runner.cpu_infer_runner.predictions_path={root}/pred",
        f"runner.cpu_infer_runner.topk={TOPK}",
    ]
    args = ["-m", "paddlerec.run", "-m", CONFIG, "--no-progress"]
    for o in overrides:
        args += ["-o", o]
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-2000:]
    offline = {}
    with open(root / "pred" / f"{EPOCHS}.txt") as f:
        next(f)
        for line in f:
            q, items, scores = line.rstrip("\n").split("\t")
            offline[int(q)] = (items.split(), [float(s) for s in scores.split()])
    clicks = [[labels[int(i)] for i in s] for s in sessions]
    return dict(root=root, labels=labels, clicks=clicks, offline=offline, n_items=n_items,
                seen={labels[int(i)] for s in sessions for i in s})


def serve_config(trained, *extra):
    from paddlerec.config import load_config

    return load_config(CONFIG, ["mode=[serve_runner]", f"runner.serve_runner.init_model_path={trained['root']}/inference",
                                f"runner.serve_runner.topk={TOPK}", "runner.serve_runner.port=0", *extra])


class Running:
    """An in-process server (uvicorn in a thread) on a free port, stopped on exit."""

    def __init__(self, service, host="127.0.0.1"):
        from paddlerec.serve import HttpServer

        self.service = service
        self.server = HttpServer(service, host, 0)
        self.port = self.server.port
        self.thread = threading.Thread(target=self.server.serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the server did not stop"

    def call(self, method, path, body=None, raw=None, headers=None):
        """(status, decoded JSON answer, or the text when it is not JSON) of one request on a new connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            connection.request(method, path, data, headers or {})
            response = connection.getresponse()
            text = response.read()
            try:
                return response.status, json.loads(text or b"null")
            except ValueError:
                return response.status, text.decode("utf-8", "replace")
        finally:
            connection.close()

    def click(self, session, item, **extra):
        return self.call("POST", "/click", dict(session=session, item=item, **extra))


@pytest.fixture(scope="module")
def service(trained):
    from paddlerec.serve import build_service

    service = build_service(serve_config(trained), "serve_runner")
    yield service
    service.close()


@pytest.fixture
def server(service):
    with Running(service) as running:
        yield running


def test_health_describes_the_served_model(server, trained):
    status, health = server.call("GET", "/health")
    assert status == 200
    assert health["status"] == "ok"
    assert health["model"] == str(trained["root"] / "inference" / str(EPOCHS))
    assert (health["epoch"], health["n_items"], health["topk"], health["vocab"]) == (EPOCHS, trained["n_items"], TOPK, True)
    assert health["max_sessions"] == 100000


def test_click_keeps_the_session_state(server, trained):
    first, second = trained["clicks"][0][:2]
    status, a1 = server.click("keep-a", first, topk=5)
    status2, a2 = server.click("keep-a", second, topk=5)
    status3, b1 = server.click("keep-b", second, topk=5)
    assert (status, status2, status3) == (200, 200, 200)
    assert (a1["clicks"], a2["clicks"], b1["clicks"]) == (1, 2, 1)
    assert len(a2["items"]) == len(a2["scores"]) == 5
    assert set(a2["items"]) <= set(trained["labels"])
    assert a2["scores"] == sorted(a2["scores"], reverse=True)
    # the same item after another click recommends differently than as a first click
    assert a2["scores"] != b1["scores"]


def assert_same_topk(answer, expected, where):
    ids, scores = expected
    assert answer["items"] == ids, f"{where}: served {answer['items']} offline {ids}"
    np.testing.assert_allclose(answer["scores"], scores, rtol=2e-5, atol=2e-5, err_msg=where)


def test_served_topk_equals_offline_one_click_at_a_time(server, trained):
    """Four clients at once, each replaying its share of the sessions click by click."""
    sessions = list(enumerate(trained["clicks"]))
    assert len(trained["offline"]) == len(sessions) == 100
    finals = {}

    def replay(part):
        for q, clicks in part:
            for item in clicks:
                status, answer = server.click(f"one-{q}", item)
                assert status == 200, answer
            finals[q] = answer

    threads = [threading.Thread(target=replay, args=(sessions[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(finals) == 100
    for q, answer in finals.items():
        assert answer["clicks"] == len(trained["clicks"][q])
        assert_same_topk(answer, trained["offline"][q], f"session {q}")


def test_batch_equals_offline_and_steps_repeated_sessions_in_order(server, trained):
    """Whole sessions in one request each: a session's clicks are stepped in request order."""
    sessions = trained["clicks"]
    for start in range(0, len(sessions), 25):
        group = list(range(start, start + 25))
        clicks = [{"session": f"batch-{q}", "item": item} for q in group for item in sessions[q]]
        status, answer = server.call("POST", "/batch", {"clicks": clicks})
        assert status == 200, answer
        results = answer["results"]
        assert len(results) == len(clicks)
        last = {}
        for click, result in zip(clicks, results):
            assert result["session"] == click["session"]
            last[click["session"]] = result
        for q in group:
            assert_same_topk(last[f"batch-{q}"], trained["offline"][q], f"session {q}")


def test_batch_answers_equal_single_clicks(server, trained):
    a, b, c = trained["clicks"][1][:3]
    singles = [server.click("single", item)[1] for item in (a, b, c)]
    status, answer = server.call("POST", "/batch", {"clicks": [{"session": "batched", "item": x} for x in (a, b, c)]})
    assert status == 200
    for one, batched in zip(singles, answer["results"]):
        assert (batched["items"], batched["clicks"]) == (one["items"], one["clicks"])
        np.testing.assert_allclose(batched["scores"], one["scores"], rtol=1e-6)


def small_service(service, **runner):
    """Another service on the same model, with other serve runner keys."""
    from paddlerec.serve import Recommender

    return Recommender(service.model, dict(service.runner, **runner), "runner.small")


def known_item(service, n=0):
    model = service.model
    return model.labels_of(np.flatnonzero(model.info.known)[n])


def test_least_recently_clicked_session_is_evicted(service):
    small = small_service(service, max_sessions=2, max_batch=8)
    item = known_item(service)
    with Running(small) as server:
        assert server.click("s1", item)[1]["clicks"] == 1
        assert server.click("s2", item)[1]["clicks"] == 1
        assert server.click("s1", item)[1]["clicks"] == 2  # s1 is now the most recent
        assert server.click("s3", item)[1]["clicks"] == 1  # evicts s2
        health = server.call("GET", "/health")[1]
        assert (health["sessions"], health["max_sessions"], health["evicted"]) == (2, 2, 1)
        assert server.click("s1", item)[1]["clicks"] == 3  # kept
        assert server.click("s2", item)[1]["clicks"] == 1  # came back with a fresh state (evicts s3)
        assert server.click("s3", item)[1]["clicks"] == 1
        # more sessions in one request than the server keeps: refused, nothing evicted
        status, answer = server.call("POST", "/batch", {"clicks": [{"session": s, "item": item} for s in "xyz"]})
        assert status == 413 and "at most 2" in answer["error"]
        assert server.call("GET", "/health")[1]["evicted"] == 3
    small.close()


def test_idle_sessions_expire_after_the_ttl():
    """The TTL runs on the store's clock (given here): the least recently clicked go first."""
    from paddlerec.serve import SessionStore

    store = SessionStore(capacity=4, hidden_size=3, ttl_s=10.0)
    rows = {s: store.slot(s, now) for s, now in (("old", 0.0), ("mid", 5.0), ("new", 9.0))}
    store.states[rows["mid"]] = 1.0
    store.expire(now=10.0)  # nobody idle longer than 10 s yet
    assert len(store) == 3
    store.slot("old", now=12.0)  # clicked again: now the most recent
    store.expire(now=15.5)  # mid (idle 10.5 s) goes; new (6.5 s) and old (3.5 s) stay
    assert list(store.slots) == ["new", "old"] and store.evicted == {"lru": 0, "idle": 1}
    row = store.slot("mid", now=16.0)  # comes back with a zero state
    assert not store.states[row].any() and store.clicks[row] == 0
    store.expire(now=100.0)
    assert len(store) == 0 and store.evicted["idle"] == 4
    never = SessionStore(capacity=2, hidden_size=3, ttl_s=0.0)  # 0: no TTL
    never.slot("a", now=0.0)
    never.expire(now=1e9)
    assert len(never) == 1


def test_exclude_seen_drops_the_sessions_clicks_and_keeps_its_state(service, trained):
    """exclude_seen (per request here) removes the session's clicks from the top-K, and nothing
    else: the rest keep their order and scores, and the session's state is the same."""
    clicks = trained["clicks"][5][:4]
    with Running(service) as server:
        for n, item in enumerate(clicks):
            _, plain = server.click("plain", item, topk=TOPK)
            _, excluded = server.click("excl", item, topk=TOPK, exclude_seen=True)
            assert plain["clicks"] == excluded["clicks"] == n + 1
            seen = set(clicks[:n + 1])
            assert not seen & set(excluded["items"]), (n, excluded["items"])
            rest = [(i, s) for i, s in zip(plain["items"], plain["scores"]) if i not in seen]
            assert [i for i, _ in rest] == excluded["items"][:len(rest)]
            np.testing.assert_allclose([s for _, s in rest], excluded["scores"][:len(rest)], rtol=1e-6)
        # the same states: without exclusion both sessions answer alike
        assert server.click("plain", clicks[0])[1]["items"] == server.click("excl", clicks[0])[1]["items"]
        status, answer = server.click("excl", clicks[0], exclude_seen="yes")
        assert status == 400 and "exclude_seen must be true or false" in answer["error"]


def test_exclude_seen_is_a_config_default_a_request_overrides(service, trained):
    clicks = trained["clicks"][6][:3]
    excluding = small_service(service, exclude_seen=True)
    with Running(excluding) as server:
        for item in clicks:
            _, answer = server.click("by-default", item)
            _, overridden = server.click("overridden", item, exclude_seen=False)
        assert not set(clicks) & set(answer["items"])
        batch = server.call("POST", "/batch", {"clicks": [{"session": "b", "item": i} for i in clicks]})[1]
        assert batch["results"][-1]["items"] == answer["items"]
        assert server.call("GET", "/health")[1]["exclude_seen"] is True
    excluding.close()
    # the override gave the model's plain ranking: the same as a server without exclusion
    with Running(service) as server:
        for item in clicks:
            _, plain = server.click("plain-6", item)
    assert overridden["items"] == plain["items"]


def test_memory_bound_caps_the_session_count():
    from paddlerec.errors import ConfigError
    from paddlerec.serve import state_capacity

    runner = {"max_sessions": 100000, "max_state_mb": 1.0}
    assert state_capacity(runner, hidden_size=100, prefix="runner.s") == 2 ** 20 // 400
    assert state_capacity(dict(runner, max_sessions=7), hidden_size=100, prefix="runner.s") == 7
    with pytest.raises(ConfigError, match=r"runner\.s\.max_state_mb"):
        state_capacity(dict(runner, max_state_mb=1e-6), hidden_size=100, prefix="runner.s")


def test_end_frees_the_session(server, trained):
    item = trained["clicks"][2][0]
    server.click("ending", item)
    assert server.call("POST", "/end", {"session": "ending"})[1] == {"session": "ending", "ended": True}
    assert server.call("POST", "/end", {"session": "ending"})[1] == {"session": "ending", "ended": False}
    assert server.click("ending", item)[1]["clicks"] == 1


BAD_REQUESTS = [
    # (method, path, body or raw bytes, expected status, words the message holds)
    ("POST", "/click", b'{"session": "x", "item": ', 400, "not valid JSON"),
    ("POST", "/click", b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/click", [1, 2], 400, "JSON object"),
    ("POST", "/click", {"item": "P1000"}, 400, "missing field 'session'"),
    ("POST", "/click", {"session": "bad"}, 400, "missing field 'item'"),
    ("POST", "/click", {"session": "bad", "item": 1.5}, 400, "item must be a string or an integer"),
    ("POST", "/click", {"session": "bad", "item": True}, 400, "item must be"),
    ("POST", "/click", {"session": None, "item": "P1000"}, 400, "session must be"),
    ("POST", "/click", {"session": ["a"], "item": "P1000"}, 400, "session must be"),
    ("POST", "/click", {"session": "", "item": "P1000"}, 400, "session is empty"),
    ("POST", "/click", {"session": "x" * 300, "item": "P1000"}, 400, "longer than"),
    ("POST", "/click", {"session": "bad", "item": "no-such-item"}, 422, "unknown item 'no-such-item'"),
    ("POST", "/click", {"session": "bad", "item": 1000}, 422, "unknown item '1000'"),
    ("POST", "/click", {"session": "bad", "item": "P1000", "topk": 0}, 400, "topk must be"),
    ("POST", "/click", {"session": "bad", "item": "P1000", "topk": TOPK + 1}, 400, "topk must be"),
    ("POST", "/click", {"session": "bad", "item": "P1000", "topk": "5"}, 400, "topk must be"),
    ("POST", "/batch", {"clicks": []}, 400, "clicks is empty"),
    ("POST", "/batch", {"clicks": "P1000"}, 400, '"clicks"'),
    ("POST", "/batch", {"clicks": [{"session": "b", "item": "P1000"}, {"session": "b"}]}, 400, "missing field 'clicks[1].item'"),
    ("POST", "/batch", {"clicks": [{"session": "b", "item": "P1000"}] * 1025}, 413, "at most 1024"),
    ("POST", "/end", {"item": "x"}, 400, "missing field 'session'"),
    ("POST", "/nowhere", {}, 404, "no endpoint /nowhere"),
    ("GET", "/click", None, 405, "/click takes POST"),
    ("POST", "/health", {}, 405, "/health takes GET"),
    ("DELETE", "/click", None, 405, "/click takes POST, not DELETE"),
    ("PURGE", "/health", None, 405, "/health takes GET, not PURGE"),
    ("BREW", "/click", None, 405, "/click takes POST, not BREW"),
    ("POST", "/click", {"session": "bad", "item": "P1000", "exclude_seen": 1}, 400, "exclude_seen must be"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD_REQUESTS,
                         ids=[f"{i}-{r[1]}-{r[3]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_4xx_and_changes_nothing(server, trained, method, path, body, status, words):
    item = trained["clicks"][3][0]
    assert server.click("survivor", item)[0] == 200
    before = server.call("GET", "/health")[1]
    raw = body if isinstance(body, bytes) else None
    got, answer = server.call(method, path, None if raw is not None else body, raw=raw)
    assert got == status, answer
    assert words in answer["error"]
    after = server.call("GET", "/health")[1]
    assert after["sessions"] == before["sessions"]
    assert after["clicks"] == before["clicks"]
    assert after["client_errors"] == before["client_errors"] + 1
    # still serving, and the session before the bad request kept its state
    status_ok, again = server.click("survivor", item)
    assert status_ok == 200 and again["clicks"] >= 2


def test_unknown_item_in_a_batch_refuses_the_whole_batch(server, trained):
    never_clicked = [label for label in trained["labels"] if label not in trained["seen"]]
    assert never_clicked  # the fixture's vocab ends with items no session clicked
    good = trained["clicks"][4][0]
    clicks = [{"session": "atomic-1", "item": good}, {"session": "atomic-2", "item": never_clicked[0]}]
    status, answer = server.call("POST", "/batch", {"clicks": clicks})
    assert status == 422
    assert f"'{never_clicked[0]}' (clicks[1])" in answer["error"]
    assert server.click("atomic-1", good)[1]["clicks"] == 1  # the batch changed no state


def test_model_ids_are_served_when_the_export_has_no_vocab(tmp_path):
    """Without a vocab the ids are the model ids; ids never clicked in training are refused."""
    from paddlerec import export
    from paddlerec.serve import Model, Recommender

    sessions = random_sessions(40, 30, seed=3)
    model = make_model(sessions, n_items=34)  # ids 30..33 never clicked
    info = export.read_export(export.write_export(str(tmp_path), 1, model, 5, None))
    assert info.labels is None and not info.known[30:].any()
    service = Recommender(Model(info, 1, "cpu"), runner_keys(topk=5, max_sessions=10, max_batch=8), "runner.t")
    with Running(service) as server:
        status, answer = server.click("m", 0)
        assert status == 200 and all(item.isdigit() and int(item) < 30 for item in answer["items"])
        assert server.click("m", "0")[1]["clicks"] == 2
        for bad in (31, "34", "-1", "3.0", "x"):
            status, answer = server.click("m", bad)
            assert status == 422, (bad, answer)
    service.close()


def runner_keys(**values):
    """A serve runner's keys: the declared defaults, then `values`."""
    from paddlerec.registry import SERVE_PARAMS

    keys = {p.name: p.default for p in SERVE_PARAMS if not p.required}
    keys.update(dict(init_model_path=""), **values)
    return keys


def test_outputs_named_fetch_name_n_are_served_by_position(tmp_path, monkeypatch):
    """An export whose outputs kept Paddle's fetch_name_<i> serves the same answers as a renamed one."""
    from paddlerec import export
    from paddlerec.serve import Model, Recommender

    model = make_model(random_sessions(40, 30, seed=4), layers=[8, 6])
    renamed = export.read_export(export.write_export(str(tmp_path / "renamed"), 1, model, 5, None))
    monkeypatch.setattr(export, "_name_outputs", lambda path, names: None)  # as Paddle writes it
    plain = export.read_export(export.write_export(str(tmp_path / "plain"), 1, model, 5, None))
    answers = []
    for info in (renamed, plain):
        served = Model(info, 1, "cpu")
        service = Recommender(served, runner_keys(topk=5, max_sessions=10), "runner.t")
        answers.append((served.predictor.get_output_names(), service.batch(
            {"clicks": [{"session": "s", "item": "0"}, {"session": "s", "item": "1"}]})))
        service.close()
    assert answers[0][0] == ["topk_ids", "topk_scores", "next_hidden"]
    assert answers[1][0] == ["fetch_name_0", "fetch_name_1", "fetch_name_2"]
    assert answers[0][1] == answers[1][1]


def start_cli(args):
    """A server process; returns (process, port) once it printed or logged its URL."""
    process = subprocess.Popen([PYTHON] + args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=REPO))
    found = []
    stream = process.stdout if args[1] == "paddlerec.serve" else process.stderr

    def watch():
        for line in stream:
            match = re.search(r"http://(?:[\d.]+|\[[\da-f:]+\]):(\d+)", line)
            if match:
                found.append(int(match.group(1)))
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    watcher.join(timeout=120)
    if not found:
        process.kill()
        raise AssertionError(f"no URL from {args}: {process.communicate()[1][-2000:]}")
    return process, found[0]


def post(port, path, body):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST" if body is not None else "GET", path, json.dumps(body) if body is not None else None)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("entry", ["paddlerec.serve", "paddlerec.run"])
def test_entry_points_serve_until_sigterm_and_reload_on_sighup(trained, tmp_path, entry):
    """The command serves (on every interface with --host 0.0.0.0), reloads a newer export on
    SIGHUP keeping the session, and stops with exit 0 on SIGTERM."""
    item = trained["clicks"][0][0]
    root = str(tmp_path / "inference")
    exported = str(trained["root"] / "inference" / str(EPOCHS))
    copy_export(exported, root, EPOCHS)
    overrides = ["-o", f"runner.serve_runner.init_model_path={root}", "-o", f"runner.serve_runner.topk={TOPK}"]
    if entry == "paddlerec.serve":
        args = ["-m", entry, "-m", CONFIG, "--port", "0", "--host", "0.0.0.0"] + overrides
    else:
        args = ["-m", entry, "-m", CONFIG, "-o", "mode=[serve_runner]", "-o", "runner.serve_runner.port=0"] + overrides
    process, port = start_cli(args)
    try:
        status, answer = post(port, "/click", {"session": "cli", "item": item})
        assert status == 200 and len(answer["items"]) == TOPK
        copy_export(exported, root, EPOCHS + 1)
        process.send_signal(signal.SIGHUP)
        newer = os.path.join(root, str(EPOCHS + 1))
        for _ in range(600):  # the reload loads and warms the model in the background
            if post(port, "/health", None)[1]["model"] == newer:
                break
            threading.Event().wait(0.1)
        assert post(port, "/health", None)[1]["model"] == newer
        assert post(port, "/click", {"session": "cli", "item": item})[1]["clicks"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    assert re.search(r"served \d+ requests \(2 clicks, 0 refused\)", err), err[-1000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("extra,key", [
    (["--port", "70000"], "runner.serve_runner.port: must be <= 65535"),
    (["-o", "runner.serve_runner.max_sesions=5"], "runner.serve_runner.max_sesions: unknown key (did you mean 'max_sessions'?)"),
    (["-o", "runner.serve_runner.init_model_path=/nonexistent/folder"], "runner.serve_runner.init_model_path: /nonexistent"),
    (["-o", f"runner.serve_runner.topk={TOPK + 5}"], "runner.serve_runner.topk: 15, but the model"),
    (["--runner", "cpu_train_runner"], "--runner: runner 'cpu_train_runner' is not of class serve"),
])
def test_config_errors_are_one_line_exit_2(trained, extra, key):
    args = ["-m", "paddlerec.serve", "-m", CONFIG, "-o",
            f"runner.serve_runner.init_model_path={trained['root']}/inference"] + extra
    done = run_cli(args, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and key in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_checkpoint_folder_is_not_served(trained):
    args = ["-m", "paddlerec.serve", "-m", CONFIG, "-o", f"runner.serve_runner.init_model_path={trained['root']}/ck"]
    done = run_cli(args, timeout=120)
    assert done.returncode == 2
    assert "holds no inference model" in done.stderr and "checkpoint folder instead" in done.stderr


def test_ready_and_metrics_in_prometheus_text_format(service, trained):
    from prometheus_client.parser import text_string_to_metric_families

    item = trained["clicks"][7][0]
    with Running(service) as server:
        assert server.call("GET", "/ready") == (200, {"ready": True, "model": service.model.folder})
        server.click("metrics-a", item)
        server.click("metrics-a", "no-such-item")
        server.call("POST", "/batch", {"clicks": [{"session": "metrics-b", "item": item}]})
        status, text = server.call("GET", "/metrics")
    assert status == 200 and isinstance(text, str)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = lambda name: [s for s in families[name].samples]  # noqa: E731
    requests = {(s.labels["endpoint"], s.labels["code"]): s.value for s in samples("paddlerec_http_requests")
                if s.name.endswith("_total")}
    assert requests[("/click", "200")] >= 1 and requests[("/click", "422")] >= 1
    assert requests[("/batch", "200")] >= 1 and requests[("/ready", "200")] >= 1
    assert not [key for key in requests if key[1].startswith("5")]
    assert families["paddlerec_http_request_seconds"].type == "histogram"
    buckets = [s for s in samples("paddlerec_http_request_seconds")
               if s.name.endswith("_bucket") and s.labels["endpoint"] == "/click"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 2
    assert [s.value for s in samples("paddlerec_sessions_live")][0] >= 2
    assert {s.labels["reason"] for s in samples("paddlerec_sessions_evicted")} == {"lru", "idle"}
    predictor = {s.name: s.value for s in samples("paddlerec_predictor_seconds")}
    assert predictor["paddlerec_predictor_seconds_count"] >= 2 and predictor["paddlerec_predictor_seconds_sum"] > 0
    info = samples("paddlerec_model_info")[0]
    assert info.labels == {"folder": service.model.folder, "epoch": str(EPOCHS)} and info.value == 1


def test_malformed_requests_never_get_a_5xx_nor_a_traceback(service, trained, caplog):
    """Bad headers, bad methods, oversized bodies and client resets, on raw sockets: each gets a
    4xx (or, for a reset or a truncated request, nothing), the server keeps serving, the log has
    no traceback and /metrics counts no 5xx."""
    from paddlerec.serve import MAX_BODY_BYTES, MAX_HEADER_BYTES

    caplog.set_level(logging.DEBUG)
    item = trained["clicks"][8][0]
    good = json.dumps({"session": "raw", "item": item}).encode()
    post = lambda headers, body=good: (b"POST /click HTTP/1.1\r\nHost: x\r\n" + headers  # noqa: E731
                                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    answered = [
        b"NONSENSE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX: \x00\x01\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX: \xff\xfe\xc3\r\n\r\n",
        b"GET /he\xffalth HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",  # no Host
        b"POST /click HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /click HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /click HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /click HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"POST /click HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
        b"POST /click HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}",
        post(b"Content-Type: text/\xff\r\n"),
        post(b"", b'{"session": "raw", "item": "' + b"\xff" * 10 + b'"}'),
        b"BREW /click HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G@T /click HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
    ]
    with Running(service) as server:
        statuses = {}
        for raw in answered:
            statuses[raw[:60]] = raw_status(server.port, raw)
        # resets: mid-headers, mid-body, and after a whole request, before its answer is read
        for raw in (b"POST /click HTTP/1.1\r\nHost: x\r\nContent-Le", post(b"")[:-10], post(b"")):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(raw)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # linger 0: the peer gets a TCP reset
        # a body over the limit on a kept-alive connection: 413, then the connection still serves
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/batch", b"[" + b" " * (2 * MAX_BODY_BYTES) + b"]")
        response = connection.getresponse()
        assert response.status == 413 and "at most" in json.loads(response.read())["error"]
        connection.request("POST", "/click", good)
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["session"] == "raw"
        connection.close()
        assert server.call("GET", "/health")[0] == 200
        _, text = server.call("GET", "/metrics")
    bad = {raw: status for raw, status in statuses.items() if status is not None and not 200 <= status < 500}
    assert not bad, bad
    assert statuses[b"BREW /click HTTP/1.1\r\nHost: x\r\n\r\n"] == 405
    assert statuses[answered[15][:60]] == 413
    assert not re.search(r'code="5\d\d"', text)
    logged = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage() or r.levelno >= logging.ERROR]
    assert not logged, [r.getMessage() for r in logged]


def raw_status(port, raw):
    """Status of the answer to raw bytes on a new connection; None when the server closed it unanswered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        response.read()
        return response.status


def copy_export(source, root, epoch):
    """A copy of an export folder as `<root>/<epoch>`, renamed into place whole (as the trainer does)."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{epoch}")
    shutil.copytree(source, tmp)
    os.rename(tmp, os.path.join(root, str(epoch)))
    return os.path.join(root, str(epoch))


def test_reload_during_load_fails_no_request_and_keeps_the_sessions(trained, tmp_path):
    """8 clients replay the sessions click by click; midway the newest export changes and POST
    /reload swaps it in. Every request succeeds, and each session's final top-K still equals
    the offline one: its state went on across the reload."""
    from paddlerec.serve import build_service

    exported = str(trained["root"] / "inference" / str(EPOCHS))
    root = str(tmp_path / "inference")
    copy_export(exported, root, EPOCHS)
    service = build_service(serve_config(trained, f"runner.serve_runner.init_model_path={root}"), "serve_runner")
    sessions = list(enumerate(trained["clicks"]))
    total = sum(len(c) for c in trained["clicks"])
    done, failures, finals = [], [], {}
    halfway, go = threading.Barrier(9), threading.Event()
    with Running(service) as server:
        def replay(part):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            for n, (q, clicks) in enumerate(part):
                if n == len(part) // 2:  # half the sessions done: the reload starts while the rest go on
                    halfway.wait(timeout=120)
                    go.wait(timeout=120)
                for item in clicks:
                    connection.request("POST", "/click", json.dumps({"session": f"r-{q}", "item": item}))
                    response = connection.getresponse()
                    answer = json.loads(response.read())
                    if response.status != 200:
                        failures.append((response.status, answer))
                    done.append(1)
                finals[q] = answer
            connection.close()

        threads = [threading.Thread(target=replay, args=(sessions[i::8],)) for i in range(8)]
        for thread in threads:
            thread.start()
        halfway.wait(timeout=120)
        copy_export(exported, root, EPOCHS + 1)
        clicks_before = len(done)
        go.set()
        status, reloaded = server.call("POST", "/reload")
        for thread in threads:
            thread.join()
        health = server.call("GET", "/health")[1]
    service.close()
    assert status == 200 and reloaded["reloaded"], reloaded
    assert reloaded["model"] == os.path.join(root, str(EPOCHS + 1)) and reloaded["sessions_kept"] > 0
    assert 0 < clicks_before < total
    assert not failures, failures[:5]
    assert (health["model"], health["reloads"], health["clicks"]) == (reloaded["model"], 1, total)
    for q, answer in finals.items():
        assert answer["clicks"] == len(trained["clicks"][q])
        assert_same_topk(answer, trained["offline"][q], f"session {q}")
    # nothing newer: nothing to do
    service = build_service(serve_config(trained, f"runner.serve_runner.init_model_path={root}"), "serve_runner")
    assert service.reload()["reloaded"] is False
    service.close()


def test_reload_to_another_hidden_size_drops_the_states(tmp_path, caplog):
    from paddlerec import export
    from paddlerec.serve import Model, Recommender

    sessions = random_sessions(40, 30, seed=6)
    root = str(tmp_path / "inference")
    info = export.read_export(export.write_export(root, 1, make_model(sessions, layers=[8]), 5, None))
    service = Recommender(Model(info, 1, "cpu"), runner_keys(init_model_path=root, topk=5), "runner.t")
    service.click({"session": "a", "item": 0})
    assert service.click({"session": "a", "item": 1})["clicks"] == 2
    export.write_export(root, 2, make_model(sessions, layers=[6]), 5, None)
    caplog.set_level(logging.INFO)
    answer = service.reload()
    assert answer["reloaded"] and answer["sessions_kept"] == 0 and answer["model"].endswith("2")
    assert "dropping the 1 live sessions' states" in caplog.text
    assert service.click({"session": "a", "item": 1})["clicks"] == 1
    assert service.health()["epoch"] == 2
    service.close()


def damage(folder, how):
    """Damage an export folder the ways a copy goes wrong; returns the file the refusal must name."""
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    if how == "missing weights":
        os.remove(path("model.pdiparams"))
        return path("model.pdiparams")
    if how == "truncated weights":
        with open(path("model.pdiparams"), "r+b") as f:
            f.truncate(os.path.getsize(path("model.pdiparams")) // 2)
        return path("model.pdiparams")
    if how == "flipped byte":
        with open(path("model.json"), "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
        return path("model.json")
    if how == "short vocab":
        with open(path("vocab.txt")) as f:
            lines = f.readlines()
        with open(path("vocab.txt"), "w") as f:
            f.writelines(lines[:-1])
        return path("vocab.txt")
    if how == "garbled io.json":
        with open(path("io.json"), "w") as f:
            f.write("{not json")
        return path("io.json")
    raise ValueError(how)


DAMAGES = ["missing weights", "truncated weights", "flipped byte", "short vocab", "garbled io.json"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_export_is_refused_at_start_and_at_reload(trained, tmp_path, how):
    from paddlerec.errors import CheckpointError
    from paddlerec.serve import RequestError, build_service

    exported = str(trained["root"] / "inference" / str(EPOCHS))
    named = damage(copy_export(exported, str(tmp_path / "bad"), EPOCHS), how)
    with pytest.raises(CheckpointError) as refused:
        build_service(serve_config(trained, f"runner.serve_runner.init_model_path={tmp_path}/bad"), "serve_runner")
    message = str(refused.value)
    assert message.startswith(named + ":") and "\n" not in message, message
    # serving a good export: a damaged newer one is refused, the good one keeps serving
    root = str(tmp_path / "good")
    copy_export(exported, root, EPOCHS)
    service = build_service(serve_config(trained, f"runner.serve_runner.init_model_path={root}"), "serve_runner")
    item = trained["clicks"][9][0]
    service.click({"session": "d", "item": item})
    damage(copy_export(exported, root, EPOCHS + 1), how)
    with pytest.raises(RequestError) as conflict:
        service.reload()
    assert conflict.value.status == 409
    assert f"{os.path.join(root, str(EPOCHS + 1), os.path.basename(named))}:" in conflict.value.message
    assert service.model.folder == os.path.join(root, str(EPOCHS))
    assert service.click({"session": "d", "item": item})["clicks"] == 2
    service.close()


def test_a_damaged_export_stops_the_command_with_one_line(trained, tmp_path):
    named = damage(copy_export(str(trained["root"] / "inference" / str(EPOCHS)), str(tmp_path), EPOCHS),
                   "missing weights")
    done = run_cli(["-m", "paddlerec.serve", "-m", CONFIG, "-o", f"runner.serve_runner.init_model_path={tmp_path}"],
                   timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert lines == [f"checkpoint error: {named}: missing; the export is incomplete (copy the whole folder, or "
                     f"export the model again)"], done.stderr[-2000:]


def test_stopping_drains_a_request_in_flight(service, trained):
    """A click waiting for the predictor when the server is told to stop (as SIGTERM does) is
    still answered; the server then ends."""
    item = trained["clicks"][10][0]
    answers = []
    running = Running(service).__enter__()
    before = service.health()["requests"]
    with service.stepper.lock:  # a predictor call in progress
        client = threading.Thread(target=lambda: answers.append(running.click("drained", item)))
        client.start()
        while service.counts["requests"] == before:  # the click arrived; it waits for the predictor
            threading.Event().wait(0.005)
        running.server.stop()
        assert not service.ready
    client.join(timeout=60)
    running.thread.join(timeout=60)
    assert not running.thread.is_alive()
    assert answers and answers[0][0] == 200 and answers[0][1]["clicks"] == 1


def test_a_trained_export_records_its_training_and_data(trained):
    """The export a train runner writes says how it was trained and on what data."""
    with open(trained["root"] / "inference" / str(EPOCHS) / "io.json") as f:
        io = json.load(f)
    training = io["training"]
    assert training["hyper_parameters"]["layers"] == [24, 16] and training["hyper_parameters"]["n_sample"] == 64
    assert (training["runner"], training["phase"], training["config"]) == ("cpu_train_runner", "phase_train", CONFIG)
    assert training["run_id"] and training["dataset"] == "dataset_train"
    clicks = sum(len(c) for c in trained["clicks"])
    assert (io["data"]["n_items"], io["data"]["events"]) == (trained["n_items"], clicks)
    assert io["data"]["items_clicked"] == len(trained["seen"])
