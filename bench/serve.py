"""Serving bench: served top-K == offline top-K, and how fast the server answers.

Steps (each a separate process, as a user would run them):
  1. `sh data_prepare.sh --prepared <data>`: the RSC15 100k split -> vocab + session files + config;
  2. `python -m paddlerec.run`: train briefly (evaluating every epoch, so the run leaves curves),
     export the inference model, and let the infer runner write every test session's top-K
     after its whole session (predictions/<epoch>.txt);
  3. `python -m paddlerec.serve --port 0`: the server, in its own process on 127.0.0.1;
  4. from this process, replay test sessions click by click over HTTP, in three modes: one
     client sending one click per request (/click); --clients clients (8) at once, each with its
     keep-alive connection, replaying its share of the sessions (/click); one client sending
     session-parallel /batch requests (one click of each of B sessions per request). After a
     session's last click the served top-K must equal the offline one;
  5. once more with the concurrent clients, while a newer export (a copy of the served one)
     appears and POST /reload swaps it in: no request may fail, and the sessions' states must
     survive the reload (the top-K after each session's last click still equal the offline one).

Prints clicks/s and p50/p99 latency (client-side) per mode, as the median over --runs runs;
exits 1 when a served top-K differs from the offline one (beyond the order of items whose
scores tie to float precision) or a request failed, 2 on a setup failure.

    .venv/bin/python bench/serve.py                        # ~1-2 min on 2 cores (the clients share them)
    .venv/bin/python bench/serve.py --sessions 3416 --runs 1 --plot docs/curves_rsc15_100k.png
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "rsc15_sessionrec_100k"))
PYTHON = sys.executable


class Failure(Exception):
    pass


def run_step(what, args, log_path, env=None):
    """Run a command, its output to log_path; Failure (with the log's tail) when it fails."""
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        code = subprocess.call(args, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                               env=dict(os.environ, **(env or {})))
    seconds = time.perf_counter() - started
    if code != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise Failure(f"{what} failed (exit {code}); {log_path} ends with:\n{tail}")
    print(f"{what}: {seconds:.1f}s (log: {log_path})", flush=True)


def prepare(args, work):
    data = os.path.join(work, "data")
    run_step("data_prepare.sh", ["sh", os.path.join(REPO, "data_prepare.sh"), "--prepared", args.data,
                                 "--out", data], os.path.join(work, "prepare.log"))
    config = os.path.join(data, "config.yaml")
    out = os.path.join(data, "output")
    e = args.epochs
    if args.reuse and os.path.isfile(os.path.join(out, "predictions", f"{e}.txt")):
        print("train + infer: reusing", out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        run_step(f"train ({e} epochs) + infer", [
            PYTHON, "-m", "paddlerec.run", "-m", config, "--no-progress",
            "-o", "mode=[cpu_train_runner, cpu_infer_runner]",
            "-o", f"runner.cpu_train_runner.epochs={e}",
            "-o", "runner.cpu_train_runner.save_checkpoint_interval=1",
            "-o", f"runner.cpu_train_runner.save_inference_interval={e}",
            "-o", "runner.cpu_train_runner.eval_phase=phase_infer",
            "-o", f"runner.cpu_train_runner.topk={args.topk}",
            "-o", f"runner.cpu_infer_runner.init_model_path={out}/checkpoints/{e}",
            "-o", f"runner.cpu_infer_runner.topk={args.topk}",
        ], os.path.join(work, "train.log"))
    return data, config, out


def read_test(data):
    """Test sessions as lists of ORIGINAL item ids; line i is the infer runner's session i."""
    with open(os.path.join(data, "vocab.txt"), encoding="utf-8") as f:
        labels = [line.rstrip("\n") for line in f]
    with open(os.path.join(data, "all_test", "test.txt")) as f:
        return [[labels[int(t)] for t in line.split()] for line in f]


def read_predictions(path):
    """{session: (item ids, scores)} from the infer runner's TSV."""
    found = {}
    with open(path) as f:
        next(f)
        for line in f:
            session, items, scores = line.rstrip("\n").split("\t")
            found[int(session)] = (items.split(), [float(s) for s in scores.split()])
    return found


def compare(served_ids, served_scores, offline_ids, offline_scores, rel_tol):
    """'exact', 'ties' (differs only in the order of items whose scores are equal to float
    precision; the offline file holds 6 significant digits), or 'mismatch'."""
    if served_ids == offline_ids:
        return "exact"
    if len(served_ids) != len(offline_ids):
        return "mismatch"
    close = lambda a, b: abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))
    position = {item: j for j, item in enumerate(offline_ids)}
    for i, (a, b) in enumerate(zip(served_ids, offline_ids)):
        if a == b:
            continue
        if not close(served_scores[i], offline_scores[i]):
            return "mismatch"
        j = position.get(a)
        # an item outside the offline top-K may only tie with its last one
        if not close(served_scores[i], offline_scores[j] if j is not None else offline_scores[-1]):
            return "mismatch"
    return "ties"


class Server:
    """`python -m paddlerec.serve` in a child process; the URL is read from its first line."""

    def __init__(self, config, out, work, args):
        self.log_path = os.path.join(work, "serve.log")
        self.log = open(self.log_path, "w")
        cmd = [PYTHON, "-m", "paddlerec.serve", "-m", config, "--port", "0",
               "-o", f"runner.serve_runner.init_model_path={out}/inference",
               "-o", f"runner.serve_runner.topk={args.topk}",
               "-o", f"runner.serve_runner.threads={args.threads}"]
        self.process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line[0]) if line else None
        if not match:
            self.stop()
            raise Failure(f"the server did not start; see {self.log_path}")
        self.port = int(match.group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


class Client:
    def __init__(self, port):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, path, payload):
        """(status, answer, seconds) of one request on the kept-alive connection."""
        body = json.dumps(payload)
        started = time.perf_counter()
        self.connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = response.read()
        seconds = time.perf_counter() - started
        return response.status, json.loads(data), seconds

    def get(self, path):
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        return response.status, json.loads(response.read())


class Budget:
    """Stops a phase after max_requests requests or max_seconds seconds."""

    def __init__(self, max_requests, max_seconds):
        self.left = max_requests
        self.deadline = time.perf_counter() + max_seconds

    def take(self):
        if self.left <= 0 or time.perf_counter() > self.deadline:
            return False
        self.left -= 1
        return True


def check(tally, prediction, answer, rel_tol):
    kind = compare(answer["items"], answer["scores"], prediction[0], prediction[1], rel_tol)
    tally[kind] = tally.get(kind, 0) + 1
    return kind


def single_phase(client, sessions, predictions, prefix, budget, rel_tol, tally, mismatches):
    latencies = []
    started = time.perf_counter()
    for q, clicks in sessions:
        answer = None
        for item in clicks:
            if not budget.take():
                return latencies, time.perf_counter() - started
            status, answer, seconds = client.post("/click", {"session": f"{prefix}{q}", "item": item})
            if status != 200:
                raise Failure(f"/click session {q} item {item}: HTTP {status} {answer}")
            latencies.append(seconds)
        if check(tally, predictions[q], answer, rel_tol) == "mismatch":
            mismatches.append((q, answer, predictions[q]))
    return latencies, time.perf_counter() - started


def concurrent_phase(port, sessions, predictions, prefix, clients, budget, rel_tol, tally, mismatches,
                     during=None):
    """`clients` threads, each with its own connection, replay sessions[i::clients] click by
    click. during(): run by this thread while they work (e.g. a reload), once a quarter of the
    clicks were answered. Returns (latencies, seconds, failures, clicks before during())."""
    latencies, failures, lock = [], [], threading.Lock()
    total = sum(len(c) for _, c in sessions)
    answered = [0]

    def replay(part):
        client = Client(port)
        mine = []
        for q, clicks in part:
            answer = None
            for item in clicks:
                with lock:
                    if not budget.take():
                        break
                status, answer, seconds = client.post("/click", {"session": f"{prefix}{q}", "item": item})
                mine.append(seconds)
                with lock:
                    answered[0] += 1
                if status != 200:
                    with lock:
                        failures.append((q, item, status, answer))
                    answer = None
                    break
            else:
                with lock:
                    if check(tally, predictions[q], answer, rel_tol) == "mismatch":
                        mismatches.append((q, answer, predictions[q]))
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=replay, args=(sessions[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    before = None
    if during is not None:
        while answered[0] < total // 4 and any(t.is_alive() for t in threads):
            time.sleep(0.005)
        before = answered[0]
        during()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started, failures, before


def batch_phase(client, sessions, predictions, prefix, width, budget, rel_tol, tally, mismatches):
    """Session-parallel: each request carries the next click of up to `width` live sessions."""
    latencies, n_clicks = [], 0
    queue = list(sessions)
    live = []  # [session, clicks, position]
    started = time.perf_counter()
    while queue or live:
        while queue and len(live) < width:
            q, clicks = queue.pop(0)
            live.append([q, clicks, 0])
        if not budget.take():
            break
        payload = {"clicks": [{"session": f"{prefix}{q}", "item": clicks[pos]} for q, clicks, pos in live]}
        status, answer, seconds = client.post("/batch", payload)
        if status != 200:
            raise Failure(f"/batch: HTTP {status} {answer}")
        latencies.append(seconds)
        n_clicks += len(live)
        still = []
        for slot, result in zip(live, answer["results"]):
            slot[2] += 1
            if slot[2] < len(slot[1]):
                still.append(slot)
            elif check(tally, predictions[slot[0]], result, rel_tol) == "mismatch":
                mismatches.append((slot[0], result, predictions[slot[0]]))
        live = still
    return latencies, n_clicks, time.perf_counter() - started


def inside(before, after):
    """Mean milliseconds per request the server spent in predictor calls between two /health reads."""
    requests = after["requests"] - before["requests"] - 1  # the /health request itself
    return 1000.0 * (after["predictor_s"] - before["predictor_s"]) / max(requests, 1)


def calls_per_click(before, after):
    """Clicks stepped per predictor call between two /health reads (concurrent clicks share calls)."""
    return (after["clicks"] - before["clicks"]) / max(after["predictor_calls"] - before["predictor_calls"], 1)


def ms(seconds, q):
    return 1000.0 * float(np.percentile(seconds, q))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder of the GRU4Rec TSV splits (default: %(default)s)")
    parser.add_argument("--work", default="", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--reuse", action="store_true", help="reuse the trained model and predictions in --work")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="predictor threads of the server")
    parser.add_argument("--sessions", type=int, default=500, help="test sessions replayed per run and mode")
    parser.add_argument("--batch-width", type=int, default=32, help="sessions per /batch request")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the concurrent mode")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per mode (figures are medians)")
    parser.add_argument("--max-requests", type=int, default=20000, help="per run and mode")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per run and mode")
    parser.add_argument("--rel-tol", type=float, default=2e-5, help="scores this close count as tied")
    parser.add_argument("--plot", default="", help="copy the training run's curves.png here")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"error: no data folder {args.data}; pass --data", file=sys.stderr)
        return 2

    work = args.work or tempfile.mkdtemp(prefix="bench_serve_")
    os.makedirs(work, exist_ok=True)
    server = None
    try:
        data, config, out = prepare(args, work)
        if args.plot:
            shutil.copyfile(os.path.join(out, "checkpoints", "curves.png"), args.plot)
            print(f"curves: {args.plot} (from {out}/checkpoints/curves.csv)")
        predictions = read_predictions(os.path.join(out, "predictions", f"{args.epochs}.txt"))
        test = read_test(data)
        sessions = [(q, test[q]) for q in sorted(predictions)][:args.sessions]
        server = Server(config, out, work, args)
        client = Client(server.port)
        health = client.get("/health")[1]
        print(f"server: {health['model']} ({health['n_items']} items, top-{health['topk']}), "
              f"pid {server.process.pid}, port {server.port}; {len(sessions)} test sessions, "
              f"{sum(len(c) for _, c in sessions)} clicks per run and mode", flush=True)

        tally, mismatches = {}, []
        single, concurrent, batch, failed = [], [], [], []
        for run in range(args.runs):
            before = client.get("/health")[1]
            lat, seconds = single_phase(client, sessions, predictions, f"r{run}c", Budget(args.max_requests,
                                        args.max_seconds), args.rel_tol, tally, mismatches)
            after = client.get("/health")[1]
            single.append((len(lat) / seconds, ms(lat, 50), ms(lat, 99), len(lat), inside(before, after)))
            lat, seconds, failures, _ = concurrent_phase(server.port, sessions, predictions, f"r{run}p", args.clients,
                                                         Budget(args.max_requests, args.max_seconds), args.rel_tol,
                                                         tally, mismatches)
            failed += failures
            after2 = client.get("/health")[1]
            concurrent.append((len(lat) / seconds, ms(lat, 50), ms(lat, 99), len(lat), calls_per_click(after, after2)))
            lat, n_clicks, seconds = batch_phase(client, sessions, predictions, f"r{run}b", args.batch_width,
                                                 Budget(args.max_requests, args.max_seconds), args.rel_tol,
                                                 tally, mismatches)
            batch.append((len(lat) / seconds, n_clicks / seconds, ms(lat, 50), ms(lat, 99), len(lat),
                          inside(after2, client.get("/health")[1])))
            print(f"run {run + 1}: /click {single[-1][0]:.0f} clicks/s; {args.clients} clients "
                  f"{concurrent[-1][0]:.0f} clicks/s; /batch {batch[-1][1]:.0f} clicks/s", flush=True)

        # a reload while the concurrent clients work: a newer export appears, POST /reload serves it
        reload_tally, reload_mismatches, reloaded = {}, [], {}

        def reload():
            newest = str(max(int(n) for n in os.listdir(os.path.join(out, "inference")) if n.isdigit()))
            tmp = os.path.join(out, "inference", f".tmp-{int(newest) + 1}")
            shutil.copytree(os.path.join(out, "inference", newest), tmp)
            os.rename(tmp, os.path.join(out, "inference", str(int(newest) + 1)))
            reloaded.update(Client(server.port).post("/reload", {})[1])

        lat, seconds, reload_failures, clicks_before = concurrent_phase(
            server.port, sessions, predictions, "reload", args.clients, Budget(args.max_requests, args.max_seconds),
            args.rel_tol, reload_tally, reload_mismatches, during=reload)
        failed += reload_failures
        mismatches += reload_mismatches
        health = client.get("/health")[1]

        med = lambda rows, i: statistics.median(r[i] for r in rows)
        print(f"\n/click, 1 client ({int(med(single, 3))} requests per run, median of {args.runs} runs): "
              f"{med(single, 0):.0f} clicks/s, p50 {med(single, 1):.2f} ms, p99 {med(single, 2):.2f} ms; "
              f"predictor {med(single, 4):.2f} ms per request")
        print(f"/click, {args.clients} concurrent clients ({int(med(concurrent, 3))} requests per run): "
              f"{med(concurrent, 0):.0f} clicks/s, p50 {med(concurrent, 1):.2f} ms, p99 {med(concurrent, 2):.2f} ms; "
              f"{med(concurrent, 4):.2f} clicks per predictor call")
        print(f"/batch ({args.batch_width} sessions per request, {int(med(batch, 4))} requests per run): "
              f"{med(batch, 0):.0f} requests/s = {med(batch, 1):.0f} clicks/s, p50 {med(batch, 2):.2f} ms, "
              f"p99 {med(batch, 3):.2f} ms; predictor {med(batch, 5):.2f} ms per request")
        print(f"reload during {args.clients}-client load: {len(lat)} clicks ({clicks_before} before the reload), "
              f"{len(reload_failures)} failed; {reloaded.get('model')} served, {reloaded.get('sessions_kept')} "
              f"sessions kept; top-K after each session: {reload_tally.get('exact', 0)} identical, "
              f"{reload_tally.get('ties', 0)} tied order, {reload_tally.get('mismatch', 0)} differ")
        print(f"server: {health['requests']} requests, {health['clicks']} clicks, {health['sessions']} sessions kept, "
              f"{health['client_errors']} refused, {health['server_errors']} internal errors, "
              f"{health['reloads']} reload(s)")
        for key, value in reload_tally.items():
            tally[key] = tally.get(key, 0) + value
        compared = sum(tally.values())
        print(f"served vs offline top-{args.topk} after each session's last click: {compared} compared, "
              f"{tally.get('exact', 0)} identical, {tally.get('ties', 0)} differ only in the order of tied "
              f"scores, {tally.get('mismatch', 0)} differ")
        for q, answer, (ids, scores) in mismatches[:3]:
            print(f"  session {q}: served {answer['items'][:8]} {answer['scores'][:3]}\n"
                  f"            offline {ids[:8]} {scores[:3]}")
        for q, item, status, answer in failed[:3]:
            print(f"  failed: session {q} item {item}: HTTP {status} {answer}")
        code = server.stop()
        server = None
        if code != 0:
            raise Failure(f"the server exited with {code} on SIGTERM; see {work}/serve.log")
        if compared == 0 or mismatches or failed or health["server_errors"] or not reloaded.get("reloaded"):
            print("FAIL: served top-K differ from the offline ones" if mismatches else "FAIL", file=sys.stderr)
            return 1
        print("OK: served top-K equal the offline infer runner's")
        return 0
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
