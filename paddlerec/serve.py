"""`python -m paddlerec.serve -m config.yaml [--port N] [--runner NAME] [-o KEY=VALUE ...]`

Live-session recommendations over HTTP on 127.0.0.1, from an exported inference model
(model.json + model.pdiparams, run by `paddle.inference`; the training code is not used).
Each session's GRU state stays in the server between calls, so a click costs one GRU step
and one top-K over the catalogue, never a replay of the session.

    POST /click  {"session": "u1", "item": "214536502", "topk": 5 (optional)}
         -> {"session": "u1", "clicks": 3, "items": ["214536500", ...], "scores": [7.1, ...]}
    POST /batch  {"clicks": [{"session": ..., "item": ...}, ...], "topk": 5 (optional)}
         -> {"results": [one /click answer per click, in request order]}
         one predictor call per "wave": a session clicked twice in one request is stepped twice, in order
    POST /end    {"session": "u1"}  -> {"session": "u1", "ended": true}   frees the session's state
    GET  /health -> {"status": "ok", "model": ..., "sessions": ..., ...}

Item ids are the ORIGINAL ids (the lines of the export's vocab.txt; without a vocab, the model
ids), sent as strings or integers and returned as strings; session ids likewise (5 and "5" are
one session). A bad request gets a 4xx answer
{"error": "..."} and changes no state; the server keeps running.

The HTTP layer is the standard library's ThreadingHTTPServer (one thread per connection,
HTTP/1.1 keep-alive). Predictor calls and the session table share one lock: the predictor is
not safe for concurrent runs, and on CPU the GRU step and top-K, not the HTTP parsing, set
the pace (see bench/serve.py).
"""

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

import numpy as np

from .config import Config, apply_override, load_config, read_yaml, resolve_config_path
from .errors import CheckpointError, ConfigError, UserError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
IO = "io.json"
MAX_BODY_BYTES = 1 << 20  # a /batch of 1024 clicks is ~60 KB
MAX_SESSION_ID_CHARS = 256
OUTPUTS = ("topk_ids", "topk_scores", "next_hidden")


# ---- the exported model ----------------------------------------------------------------------

def is_export(path):
    return os.path.isfile(os.path.join(path, IO)) and os.path.isfile(os.path.join(path, "model.json"))


def resolve_export(path, key):
    """An inference model folder, or the newest `<epoch>/` export inside `path`."""
    if not os.path.exists(path):
        raise CheckpointError(f"{key}: {path} does not exist; train with save_inference_interval > 0 first "
                              f"(it writes save_inference_path/<epoch>/) or point it at such a folder")
    if is_export(path):
        return path
    epochs = sorted(int(name) for name in os.listdir(path)
                    if name.isdigit() and is_export(os.path.join(path, name)))
    if not epochs:
        raise CheckpointError(f"{key}: {path} holds no inference model (a folder with {IO} and model.json, "
                              f"as save_inference_path/<epoch>/); is it a checkpoint folder instead?")
    return os.path.join(path, str(epochs[-1]))


@dataclass
class Export:
    """What the server needs from an export folder (see paddlerec/checkpoint.py)."""

    folder: str
    epoch: int
    n_items: int
    topk: int  # items the model returns per row
    hidden_size: int  # width of the state input/output: sum(layers)
    outputs: List[str]  # logical output names, in the model's output order
    labels: Optional[List[str]]  # original id of each model id, or None (ids are model ids)
    known: np.ndarray  # bool [n_items]: clicked in training (the rest are never fed)

    def model_id(self, item):
        """Model id of an original id (str), or None when the model does not serve it."""
        if self.labels is not None:
            index = self._index.get(item)
        else:
            index = int(item) if item.isdigit() and item.isascii() and len(item) < 19 else None
            if index is not None and index >= self.n_items:
                index = None
        return index if index is not None and self.known[index] else None

    def label(self, model_id):
        return self.labels[model_id] if self.labels is not None else str(model_id)

    def labels_of(self, model_ids):
        """Original ids (str) of an int array of model ids, same shape."""
        return self._names[model_ids]

    def __post_init__(self):
        self._index = {label: i for i, label in enumerate(self.labels)} if self.labels is not None else None
        names = self.labels if self.labels is not None else [str(i) for i in range(self.n_items)]
        self._names = np.array(names, dtype=object)


def load_export(folder):
    path = os.path.join(folder, IO)
    try:
        with open(path, encoding="utf-8") as f:
            io = json.load(f)
        n_items, topk, hidden = int(io["n_items"]), int(io["topk"]), int(io["hidden_size"])
        outputs, vocab = list(io["outputs"]), io.get("vocab", "")
        unseen = [int(i) for i in io.get("unseen_items", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc}); re-export the model") from None
    if sorted(outputs) != sorted(OUTPUTS):
        raise CheckpointError(f"{path}: outputs {outputs} are not {list(OUTPUTS)}; this is not a GRU4Rec export")
    labels = None
    if vocab:
        labels = read_vocab(os.path.join(folder, vocab))
        if len(labels) != n_items:
            raise CheckpointError(f"{folder}: {vocab} has {len(labels)} items but the model {n_items}; "
                                  f"the export is damaged")
    known = np.ones(n_items, dtype=bool)
    known[[i for i in unseen if 0 <= i < n_items]] = False
    return Export(folder, int(io.get("epoch", 0)), n_items, topk, hidden, outputs, labels, known)


def read_vocab(path):
    try:
        with open(path, encoding="utf-8") as f:
            labels = [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable vocab ({exc}); re-export the model") from None
    if len(set(labels)) != len(labels) or any(not label for label in labels):
        raise CheckpointError(f"{path}: the vocab has empty or repeated lines; re-export the model")
    return labels


class Predictor:
    """The exported InferenceStep behind `paddle.inference`: one GRU step and top-K per row."""

    def __init__(self, export: Export, threads: int, device: str):
        from paddle import inference

        config = inference.Config(os.path.join(export.folder, "model.json"),
                                  os.path.join(export.folder, "model.pdiparams"))
        config.disable_glog_info()
        if device == "gpu":
            config.enable_use_gpu(256, 0)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads)
        self.predictor = inference.create_predictor(config)
        inputs = self.predictor.get_input_names()
        if sorted(inputs) != ["hidden", "item_ids"]:
            raise CheckpointError(f"{export.folder}: the model takes {inputs}, not item_ids and hidden; "
                                  f"this is not a GRU4Rec export")
        self.item_ids = self.predictor.get_input_handle("item_ids")
        self.hidden = self.predictor.get_input_handle("hidden")
        self.outputs = [self.predictor.get_output_handle(name) for name in self._output_names(export)]

    def _output_names(self, export):
        """Predictor output names in OUTPUTS order. Paddle 3.3 calls them fetch_name_<position>;
        io.json lists what each position holds."""
        names = self.predictor.get_output_names()
        if set(names) == set(OUTPUTS):
            return list(OUTPUTS)
        by_position = {f"fetch_name_{i}": logical for i, logical in enumerate(export.outputs)}
        if sorted(names) != sorted(by_position):
            raise CheckpointError(f"{export.folder}: the model's outputs {names} do not match {IO} "
                                  f"({export.outputs}); re-export the model")
        physical = {logical: name for name, logical in by_position.items()}
        return [physical[logical] for logical in OUTPUTS]

    def step(self, item_ids, hidden):
        """item_ids int64 [n], hidden float32 [n, H] -> topk ids int64 [n, k], scores float32 [n, k],
        next hidden float32 [n, H]."""
        self.item_ids.copy_from_cpu(item_ids)
        self.hidden.copy_from_cpu(hidden)
        self.predictor.run()
        return tuple(handle.copy_to_cpu() for handle in self.outputs)


# ---- sessions --------------------------------------------------------------------------------

class SessionStore:
    """Hidden states of the live sessions, least recently clicked evicted first.

    States live in one preallocated float32 [capacity, H] array (its size is the memory
    bound); `slots` maps session id -> row, oldest first. Not thread-safe: the caller locks.
    """

    def __init__(self, capacity, hidden_size):
        self.capacity = capacity
        self.states = np.zeros((capacity, hidden_size), dtype=np.float32)
        self.clicks = np.zeros(capacity, dtype=np.int64)  # clicks each row's session has had
        self.slots = OrderedDict()
        self.free = list(range(capacity - 1, -1, -1))
        self.evicted = 0

    def __len__(self):
        return len(self.slots)

    def slot(self, session):
        """The session's row (marked most recent); a new session gets a zero state, evicting
        the least recent session when full."""
        row = self.slots.get(session)
        if row is not None:
            self.slots.move_to_end(session)
            return row
        if self.free:
            row = self.free.pop()
        else:
            _, row = self.slots.popitem(last=False)
            self.evicted += 1
        self.states[row] = 0.0
        self.clicks[row] = 0
        self.slots[session] = row
        return row

    def end(self, session):
        row = self.slots.pop(session, None)
        if row is None:
            return False
        self.free.append(row)
        return True


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def _id_text(value, what):
    """Session and item ids: a string or an integer (JSON), used as text."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"{what} must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{what} is empty")
    return text


def _field(body, name, where):
    if name not in body:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"missing field {where + name!r}")
    return body[name]


class Recommender:
    """The service: validates clicks, steps their sessions' states through the predictor."""

    def __init__(self, export: Export, predictor, capacity: int, topk: int, max_batch: int):
        self.export = export
        self.predictor = predictor
        self.store = SessionStore(capacity, export.hidden_size)
        self.topk = topk
        self.max_batch = max_batch
        self.lock = threading.Lock()
        self.started = time.time()
        self.counts = {"requests": 0, "clicks": 0, "client_errors": 0, "server_errors": 0, "predictor_calls": 0,
                       "predictor_s": 0.0}

    # -- requests
    def parse_click(self, body, where=""):
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{where.rstrip('.') or 'the body'} must be a JSON object "
                                                       f"{{\"session\": ..., \"item\": ...}}")
        session = _id_text(_field(body, "session", where), f"{where}session")
        if len(session) > MAX_SESSION_ID_CHARS:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"{where}session is longer than {MAX_SESSION_ID_CHARS} characters")
        item = _id_text(_field(body, "item", where), f"{where}item")
        return session, item

    def parse_topk(self, body):
        k = body.get("topk", self.topk)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.topk:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"topk must be an integer from 1 to {self.topk}, got {k!r}")
        return k

    def click(self, body):
        session, item = self.parse_click(body)
        return self.run([(session, item)], self.parse_topk(body))[0]

    def batch(self, body):
        if not isinstance(body, dict) or not isinstance(body.get("clicks"), list):
            raise RequestError(HTTPStatus.BAD_REQUEST, 'the body must be {"clicks": [{"session": ..., "item": ...}, ...]}')
        raw = body["clicks"]
        if not raw:
            raise RequestError(HTTPStatus.BAD_REQUEST, "clicks is empty")
        if len(raw) > self.max_batch:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(raw)} clicks; a batch holds at most {self.max_batch} (max_batch)")
        clicks = [self.parse_click(c, f"clicks[{i}].") for i, c in enumerate(raw)]
        return {"results": self.run(clicks, self.parse_topk(body))}

    def end(self, body):
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, 'the body must be {"session": ...}')
        session = _id_text(_field(body, "session", ""), "session")
        with self.lock:
            ended = self.store.end(session)
        return {"session": session, "ended": ended}

    def health(self):
        with self.lock:
            sessions, evicted = len(self.store), self.store.evicted
            counts = dict(self.counts)
        ex = self.export
        return dict(status="ok", model=ex.folder, epoch=ex.epoch, n_items=ex.n_items, topk=self.topk,
                    vocab=ex.labels is not None, sessions=sessions, max_sessions=self.store.capacity,
                    evicted=evicted, uptime_s=round(time.time() - self.started, 3), **counts)

    def count(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    # -- the work
    def run(self, clicks, k):
        """Step each (session, item) click in order; returns one answer per click.

        Every item is checked before any state changes. A session clicked several times in one
        request is stepped once per "wave" (its n-th click in the n-th predictor call), so the
        result equals sending the clicks one by one.
        """
        ex = self.export
        items = np.empty(len(clicks), dtype=np.int64)
        unknown = []
        for i, (_, item) in enumerate(clicks):
            model_id = ex.model_id(item)
            if model_id is None:
                unknown.append(i)
            else:
                items[i] = model_id
        if unknown:
            shown = ", ".join(f"{clicks[i][1]!r}" + (f" (clicks[{i}])" if len(clicks) > 1 else "")
                              for i in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY,
                               f"unknown item {shown}{more}: not in the model's vocabulary (or never clicked in "
                               f"training); no state changed")
        sessions = [s for s, _ in clicks]
        distinct = list(dict.fromkeys(sessions))
        if len(distinct) > self.store.capacity:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(distinct)} sessions in one request; the server keeps at most "
                               f"{self.store.capacity} (max_sessions / max_state_mb)")
        wave = np.empty(len(clicks), dtype=np.int64)
        seen = {}
        for i, s in enumerate(sessions):
            wave[i] = seen.get(s, 0)
            seen[s] = wave[i] + 1
        answers = [None] * len(clicks)
        with self.lock:
            # all rows first: a later wave must never evict a session of this request
            rows = np.array([self.store.slot(s) for s in sessions], dtype=np.int64)
            for w in range(int(wave.max()) + 1):
                idx = np.flatnonzero(wave == w)
                r = rows[idx]
                started = time.perf_counter()
                top_ids, top_scores, next_hidden = self.predictor.step(items[idx], self.store.states[r])
                self.counts["predictor_s"] += time.perf_counter() - started
                self.counts["predictor_calls"] += 1
                self.store.states[r] = next_hidden
                self.store.clicks[r] += 1
                n_clicks = self.store.clicks[r].tolist()
                names = ex.labels_of(top_ids[:, :k]).tolist()
                scores = top_scores[:, :k].tolist()
                for j, i in enumerate(idx):
                    answers[i] = {"session": sessions[i], "clicks": n_clicks[j], "items": names[j], "scores": scores[j]}
            self.counts["clicks"] += len(clicks)
        return answers


# ---- HTTP --------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Routes JSON requests to the Recommender; every failure becomes a JSON error answer."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    # headers and body leave in two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK: ~40 ms per answer instead of ~1 ms
    disable_nagle_algorithm = True
    timeout = 60  # seconds a connection may stay idle (or slow) before its thread is freed
    server_version = "paddlerec-serve"
    default_request_version = "HTTP/1.0"  # so that even an answer to a garbled request line has a status line
    POST_ROUTES = {"/click": "click", "/batch": "batch", "/end": "end"}
    GET_ROUTES = {"/health": "health"}

    @property
    def service(self) -> Recommender:
        return self.server.service

    def log_message(self, format, *args):  # the base class writes every request to stderr
        log.debug("%s %s", self.address_string(), format % args)

    def _answer(self, status, payload):
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The base class's own refusals (bad request line, oversized headers, ...) as JSON too."""
        self.close_connection = True
        self._fail(code, message or HTTPStatus(code).phrase)

    def _fail(self, status, message, close=False):
        self.close_connection = self.close_connection or close
        self.service.count("client_errors" if status < 500 else "server_errors")
        self._answer(status, {"error": message})

    def _read_body(self):
        """The request's body bytes, read whole so that a kept-alive connection stays in step."""
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True  # a body may follow in a form this server does not read
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the JSON body with a Content-Length header")
        if not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
        length = int(length)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; at most {MAX_BODY_BYTES}")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is shorter than its Content-Length")
        return data

    def _handle(self, routes, with_body):
        self.service.count("requests")
        path = self.path.split("?", 1)[0]
        try:
            if with_body:
                data = self._read_body()  # before any refusal: an unread body would poison the connection
            elif self.headers.get("Content-Length", "0").strip() not in ("", "0"):
                self.close_connection = True  # a GET with a body: not read, so not reusable
            if path not in routes:
                other = self.GET_ROUTES if routes is self.POST_ROUTES else self.POST_ROUTES
                if path in other:
                    raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED,
                                       f"{path} takes {'GET' if other is self.GET_ROUTES else 'POST'}")
                raise RequestError(HTTPStatus.NOT_FOUND,
                                   f"no endpoint {path}; endpoints: POST /click, /batch, /end; GET /health")
            method = getattr(self.service, routes[path])
            if with_body:
                try:
                    body = json.loads(data)
                except (ValueError, RecursionError) as exc:
                    raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({exc})") from None
                payload = method(body)
            else:
                payload = method()
        except RequestError as exc:
            self._fail(exc.status, exc.message)
            return
        except Exception as exc:  # a bug: keep serving, tell the client, log the traceback
            log.exception("%s %s failed", self.command, path)
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__}); see the server log")
            return
        self._answer(HTTPStatus.OK, payload)

    def do_POST(self):
        self._handle(self.POST_ROUTES, with_body=True)

    def do_GET(self):
        self._handle(self.GET_ROUTES, with_body=False)

    def _not_allowed(self):
        self.service.count("requests")
        self._fail(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported; use POST or GET", close=True)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed


class Server(ThreadingHTTPServer):
    daemon_threads = True  # open keep-alive connections do not block shutdown
    allow_reuse_address = True

    def __init__(self, port, service):
        self.service = service
        super().__init__((HOST, port), Handler)

    @property
    def url(self):
        return f"http://{HOST}:{self.server_address[1]}"


# ---- building and running --------------------------------------------------------------------

def state_capacity(runner, hidden_size, prefix):
    """Sessions kept: max_sessions, capped by what max_state_mb holds at 4 bytes per state float."""
    per_session = 4 * hidden_size
    by_memory = int(runner["max_state_mb"] * 2 ** 20) // per_session
    if by_memory < 1:
        raise ConfigError(f"{prefix}.max_state_mb", f"{runner['max_state_mb']} MB holds no session "
                                                    f"(one state is {per_session} bytes)")
    return min(runner["max_sessions"], by_memory)


def build_service(config: Config, runner_name) -> Recommender:
    runner = config.runners[runner_name]
    prefix = f"runner.{runner_name}"
    folder = resolve_export(runner["init_model_path"], f"{prefix}.init_model_path")
    export = load_export(folder)
    if runner["topk"] > export.topk:
        raise ConfigError(f"{prefix}.topk", f"{runner['topk']}, but the model in {folder} returns {export.topk} "
                                            f"items; lower it or export with a larger train runner topk")
    if runner["device"] == "gpu":
        import paddle

        if not paddle.is_compiled_with_cuda():
            raise ConfigError(f"{prefix}.device", "gpu, but the installed paddlepaddle has no CUDA support; "
                                                  "set `device: cpu` or install the GPU build")
    capacity = state_capacity(runner, export.hidden_size, prefix)
    predictor = Predictor(export, runner["threads"], runner["device"])
    log.info("serving %s (epoch %d, %d items, vocab: %s); keeping up to %d sessions (%.1f MB of state)",
             folder, export.epoch, export.n_items, "yes" if export.labels is not None else "no (model ids)",
             capacity, capacity * 4 * export.hidden_size / 2 ** 20)
    return Recommender(export, predictor, capacity, runner["topk"], runner["max_batch"])


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def serve_runner(config: Config, runner_name, on_ready=None):
    """Answer HTTP until Ctrl-C or SIGTERM. on_ready(url) is called once the port is open."""
    runner = config.runners[runner_name]
    service = build_service(config, runner_name)
    try:
        server = Server(runner["port"], service)
    except OSError as exc:
        raise ConfigError(f"runner.{runner_name}.port",
                          f"cannot listen on {HOST}:{runner['port']} ({exc.strerror}); pick another port") from None
    log.info("listening on %s (POST /click, /batch, /end; GET /health); Ctrl-C stops", server.url)
    if on_ready is not None:
        on_ready(server.url)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stop) if in_main else None
    try:
        server.serve_forever()
    except (KeyboardInterrupt, _Stop):
        log.info("stopping")
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        server.server_close()
    health = service.health()
    log.info("served %d requests (%d clicks, %d refused)", health["requests"], health["clicks"],
             health["client_errors"])


def pick_runner(config_path, overrides, wanted):
    """Name of the serve runner to use: `wanted`, or the config's only runner of class serve."""
    raw = read_yaml(resolve_config_path(config_path))
    for text in overrides:
        apply_override(raw, text)
    entries = raw.get("runner") if isinstance(raw.get("runner"), list) else []
    serve = [e.get("name") for e in entries if isinstance(e, dict) and e.get("class") == "serve"]
    if wanted:
        names = [e.get("name") for e in entries if isinstance(e, dict)]
        if wanted not in names:
            raise ConfigError("--runner", f"no runner named {wanted!r}; serve runners: {', '.join(map(str, serve)) or 'none'}")
        if wanted not in serve:
            raise ConfigError("--runner", f"runner {wanted!r} is not of class serve; serve runners: "
                                          f"{', '.join(map(str, serve)) or 'none'}")
        return wanted
    if not serve:
        raise ConfigError("runner", "no runner of class serve; add one (see config.yaml's serve_runner)")
    if len(serve) > 1:
        raise ConfigError("--runner", f"several serve runners ({', '.join(map(str, serve))}); pick one with --runner NAME")
    return serve[0]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m paddlerec.serve",
        description="Serve next-click recommendations for live sessions over HTTP on 127.0.0.1 "
                    "from an exported inference model.")
    parser.add_argument("-m", "--model", required=True, metavar="CONFIG",
                        help="config YAML, or a folder holding config.yaml")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. runner.serve_runner.max_sessions=1000. Repeatable.")
    parser.add_argument("--runner", default="", metavar="NAME", help="the serve runner to use (default: the only one)")
    parser.add_argument("--port", type=int, default=None, metavar="N", help="port (overrides the runner's; 0: any free)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return parser.parse_args(argv)


def main(argv=None):
    from .logs import configure as configure_logging

    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.quiet)
    try:
        name = pick_runner(args.model, args.override, args.runner)
        overrides = list(args.override) + [f"mode={json.dumps([name])}"]
        if args.port is not None:
            overrides.append(f"runner.{name}.port={args.port}")
        config = load_config(args.model, overrides)
        # Paddle reads it once, at import
        os.environ["OMP_NUM_THREADS"] = str(config.runners[name]["threads"])
        os.environ.setdefault("GLOG_minloglevel", "2")

        def ready(url):
            print(f"serving on {url}", flush=True)

        serve_runner(config, name, on_ready=ready)
    except UserError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before the server was up (once up, Ctrl-C stops it cleanly)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
