"""The live-session server (paddlerec/serve.py): endpoints, state, eviction, bad requests,
and served top-K == the offline infer runner's top-K on a small model trained here."""

import http.client
import json
import os
import re
import signal
import socket
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
    """An in-process server on a free port, stopped on exit."""

    def __init__(self, service):
        from paddlerec.serve import Server

        self.service = service
        self.server = Server(0, service)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def call(self, method, path, body=None, raw=None, headers=None):
        """(status, decoded JSON answer) of one request on a new connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            connection.request(method, path, data, headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def click(self, session, item, **extra):
        return self.call("POST", "/click", dict(session=session, item=item, **extra))


@pytest.fixture(scope="module")
def service(trained):
    from paddlerec.serve import build_service

    return build_service(serve_config(trained), "serve_runner")


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


def test_least_recently_clicked_session_is_evicted(service):
    from paddlerec.serve import Recommender

    small = Recommender(service.export, service.predictor, capacity=2, topk=TOPK, max_batch=8)
    item = service.export.label(int(np.flatnonzero(service.export.known)[0]))
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
    ("DELETE", "/click", None, 405, "not supported"),
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


def test_protocol_abuse_does_not_stop_the_server(server):
    for raw in (b"NONSENSE\r\n\r\n", b"POST /click HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
                b"POST /click HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{}",
                b"POST /click HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}"):  # body shorter than announced
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            reply = sock.recv(4096)
        assert re.match(rb"HTTP/1\.[01] 4\d\d", reply), reply[:100]
    status, _ = server.call("POST", "/click", raw=b"{}", headers={"Transfer-Encoding": "chunked"})
    assert status in (400, 411)
    assert server.call("GET", "/health")[0] == 200


def test_model_ids_are_served_when_the_export_has_no_vocab(tmp_path):
    """Without a vocab the ids are the model ids; ids never clicked in training are refused."""
    from paddlerec import checkpoint
    from paddlerec.serve import Recommender, Predictor, load_export

    sessions = random_sessions(40, 30, seed=3)
    model = make_model(sessions, n_items=34)  # ids 30..33 never clicked
    folder = checkpoint.export_inference(str(tmp_path), 1, model, 5, None)
    export = load_export(folder)
    assert export.labels is None and not export.known[30:].any()
    with Running(Recommender(export, Predictor(export, 1, "cpu"), 10, 5, 8)) as server:
        status, answer = server.click("m", 0)
        assert status == 200 and all(item.isdigit() and int(item) < 30 for item in answer["items"])
        assert server.click("m", "0")[1]["clicks"] == 2
        for bad in (31, "34", "-1", "3.0", "x"):
            status, answer = server.click("m", bad)
            assert status == 422, (bad, answer)


def test_outputs_named_fetch_name_n_are_mapped_through_io_json(tmp_path):
    """An export whose outputs kept Paddle's fetch_name_<i> serves the same answers as a renamed one."""
    from paddlerec import checkpoint
    from paddlerec.serve import Predictor, Recommender, load_export

    model = make_model(random_sessions(40, 30, seed=4), layers=[8, 6])
    renamed = load_export(checkpoint.export_inference(str(tmp_path / "renamed"), 1, model, 5, None))
    plain = tmp_path / "plain"
    os.makedirs(plain)
    io_desc = model.export(str(plain / "model"), 5)  # paddle.jit.save only: no renaming
    (plain / "io.json").write_text(json.dumps(dict(io_desc, epoch=1, vocab="")))
    plain_export = load_export(str(plain))
    answers = []
    for export in (renamed, plain_export):
        predictor = Predictor(export, 1, "cpu")
        answers.append((sorted(predictor.predictor.get_output_names()),
                        Recommender(export, predictor, 10, 5, 8).run([("s", "0"), ("s", "1")], 5)))
    assert answers[0][0] == ["next_hidden", "topk_ids", "topk_scores"]
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
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
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


@pytest.mark.parametrize("entry", ["paddlerec.serve", "paddlerec.run"])
def test_entry_points_serve_until_sigterm(trained, entry):
    item = trained["clicks"][0][0]
    overrides = ["-o", f"runner.serve_runner.init_model_path={trained['root']}/inference",
                 "-o", f"runner.serve_runner.topk={TOPK}"]
    if entry == "paddlerec.serve":
        args = ["-m", entry, "-m", CONFIG, "--port", "0"] + overrides
    else:
        args = ["-m", entry, "-m", CONFIG, "-o", "mode=[serve_runner]", "-o", "runner.serve_runner.port=0"] + overrides
    process, port = start_cli(args)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/click", json.dumps({"session": "cli", "item": item}))
        response = connection.getresponse()
        assert response.status == 200
        assert len(json.loads(response.read())["items"]) == TOPK
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    assert re.search(r"served \d+ requests \(1 clicks, 0 refused\)", err), err[-1000:]


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
