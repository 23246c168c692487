"""`python -m paddlerec.serve -m config.yaml [--host H] [--port N] [--runner NAME] [-o KEY=VALUE ...]`

Live-session recommendations over HTTP from an exported inference model (model.json +
model.pdiparams, run by `paddle.inference`; the training code is not used). Each session's
GRU state stays in the server between calls, so a click costs one GRU step and one top-K over
the catalogue, never a replay of the session.

    POST /click  {"session": "u1", "item": "214536502", "topk": 5, "exclude_seen": true}  (last two optional)
         -> {"session": "u1", "clicks": 3, "items": ["214536500", ...], "scores": [7.1, ...]}
    POST /batch  {"clicks": [{"session": ..., "item": ...}, ...], "topk": 5, "exclude_seen": false}
         -> {"results": [one /click answer per click, in request order]}
    POST /end    {"session": "u1"}  -> {"session": "u1", "ended": true}   frees the session's state
    POST /reload -> load the newest export under init_model_path (as SIGHUP does)
    GET  /health -> {"status": "ok", "model": ..., "sessions": ..., ...}    the process answers
    GET  /ready  -> 200 when a model is loaded and warmed, 503 while draining
    GET  /metrics   Prometheus text format

Item ids are the ORIGINAL ids (the lines of the export's vocab.txt; without a vocab, the model
ids), sent as strings or integers and returned as strings; session ids likewise (5 and "5" are
one session). A bad request gets a 4xx answer {"error": "..."} and changes no state.

Layers:
    HTTP      uvicorn (h11) runs the ASGI app `App` on one event loop: parsing, JSON, routing.
    Stepper   one worker thread owns the predictor and the session table. Clicks that arrive
              while it runs are stepped together in its next predictor call, so concurrent
              clients share calls (a session's clicks keep their order: see Stepper.step).
    Model     an export checked against io.json's sizes and sha256, and its predictor. A reload
              builds and warms the new one beside the old, then swaps them between two
              predictor calls: a call in flight finishes on the model it started with.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from http import HTTPStatus

import numpy as np

from . import export as exports
from .config import Config, apply_override, load_config, read_yaml, resolve_config_path
from .errors import CheckpointError, ConfigError, UserError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a /batch of 1024 clicks is ~60 KB
MAX_HEADER_BYTES = 16 << 10  # request line + headers; more is refused (400) by the HTTP layer
MAX_SESSION_ID_CHARS = 256
MAX_EXCLUDED = 512  # clicked items remembered per session for exclude_seen (the most recent distinct ones)
KEEP_ALIVE_S = 60  # an idle keep-alive connection is closed after this
DRAIN_S = 30  # on SIGTERM, requests in flight get this long to finish
GET_ROUTES = ("/health", "/ready", "/metrics")
POST_ROUTES = ("/click", "/batch", "/end", "/reload")
# request latency buckets (seconds): a click takes ~1-5 ms, a /batch up to ~100 ms, a reload seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


# ---- the exported model ----------------------------------------------------------------------

class Model:
    """A checked export and its predictor: one GRU step, exclusion and top-K per row."""

    def __init__(self, info: exports.ExportInfo, threads: int, device: str):
        from paddle import inference

        self.info = info
        config = inference.Config(info.path(exports.PROGRAM), info.path(exports.PARAMS))
        config.disable_glog_info()
        if device == "gpu":
            config.enable_use_gpu(256, 0)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads)
        try:
            self.predictor = inference.create_predictor(config)
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. a program of another Paddle version
            raise CheckpointError(f"{info.path(exports.PROGRAM)}: paddle.inference cannot load it "
                                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); "
                                  f"export the model again with this version") from None
        names = self.predictor.get_input_names()
        if names != list(exports.INPUTS):
            raise CheckpointError(f"{info.path(exports.PROGRAM)}: the step takes {names}, not {list(exports.INPUTS)}; "
                                  f"export the model again")
        self.inputs = [self.predictor.get_input_handle(name) for name in exports.INPUTS]
        outputs = self.predictor.get_output_names()
        if outputs != list(exports.OUTPUTS):
            # Paddle's own names: io.json gives what each position holds
            if outputs != [f"fetch_name_{i}" for i in range(len(exports.OUTPUTS))]:
                raise CheckpointError(f"{info.path(exports.PROGRAM)}: the step gives {outputs}, not "
                                      f"{list(exports.OUTPUTS)}; export the model again")
        self.outputs = [self.predictor.get_output_handle(name) for name in outputs]
        self._index = {label: i for i, label in enumerate(info.labels)} if info.labels is not None else None
        names = info.labels if info.labels is not None else [str(i) for i in range(info.n_items)]
        self._names = np.array(names, dtype=object)
        self.warm()

    @property
    def folder(self):
        return self.info.folder

    def warm(self):
        """One call: the predictor allocates and picks its kernels before the first client waits."""
        n = self.info.n_items
        self.step(np.zeros(1, np.int64), np.zeros((1, self.info.hidden_size), np.float32), np.full((1, 1), n, np.int64))

    def step(self, item_ids, hidden, exclude_ids):
        """item_ids int64 [n], hidden float32 [n, H], exclude_ids int64 [n, m >= 1] (padded with
        n_items) -> topk ids int64 [n, k], scores float32 [n, k], next hidden float32 [n, H]."""
        for handle, value in zip(self.inputs, (item_ids, hidden, exclude_ids)):
            handle.reshape(list(value.shape))
            handle.copy_from_cpu(value)
        self.predictor.run()
        return tuple(handle.copy_to_cpu() for handle in self.outputs)

    def model_id(self, item):
        """Model id of an original id (str), or None when the model does not serve it."""
        if self._index is not None:
            index = self._index.get(item)
        else:
            index = int(item) if item.isdigit() and item.isascii() and len(item) < 19 else None
            if index is not None and index >= self.info.n_items:
                index = None
        return index if index is not None and self.info.known[index] else None

    def labels_of(self, model_ids):
        """Original ids (str) of an int array of model ids, same shape."""
        return self._names[model_ids]


def load_model(path, key, threads, device, topk, prefix):
    """The newest export under `path`, checked (io.json's sizes and sha256) and warmed."""
    info = exports.read_export(exports.newest_export(path, key))
    if topk > info.topk:
        raise ConfigError(f"{prefix}.topk", f"{topk}, but the model in {info.folder} returns {info.topk} items; "
                                            f"lower it or export with a larger train runner topk")
    return Model(info, threads, device)


# ---- sessions --------------------------------------------------------------------------------

class SessionStore:
    """Hidden states of the live sessions, least recently clicked first out.

    States live in one preallocated float32 [capacity, H] array (its size is the memory
    bound); `slots` maps session id -> row, least recently clicked first, so the sessions idle
    longer than the TTL are always at its front. Not thread-safe: the caller locks.
    """

    def __init__(self, capacity, hidden_size, ttl_s):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.states = np.zeros((capacity, hidden_size), dtype=np.float32)
        self.clicks = np.zeros(capacity, dtype=np.int64)  # clicks each row's session has had
        self.last_click = np.zeros(capacity, dtype=np.float64)  # time.monotonic() of its last click
        self.seen = [None] * capacity  # per row: dict model id -> None, the session's distinct clicks in order
        self.slots = OrderedDict()
        self.free = list(range(capacity - 1, -1, -1))
        self.evicted = {"lru": 0, "idle": 0}

    def __len__(self):
        return len(self.slots)

    def expire(self, now):
        """Drop the sessions idle longer than the TTL."""
        if not self.ttl_s:
            return
        while self.slots:
            session, row = next(iter(self.slots.items()))
            if now - self.last_click[row] <= self.ttl_s:
                return
            del self.slots[session]
            self.free.append(row)
            self.evicted["idle"] += 1

    def slot(self, session, now):
        """The session's row, marked clicked now; a new session gets a zero state, evicting the
        least recent session when full."""
        row = self.slots.get(session)
        if row is None:
            if self.free:
                row = self.free.pop()
            else:
                _, row = self.slots.popitem(last=False)
                self.evicted["lru"] += 1
            self.states[row] = 0.0
            self.clicks[row] = 0
            self.seen[row] = {}
            self.slots[session] = row
        else:
            self.slots.move_to_end(session)
        self.last_click[row] = now
        return row

    def remember(self, row, item):
        seen = self.seen[row]
        seen.pop(item, None)
        seen[item] = None
        if len(seen) > MAX_EXCLUDED:
            del seen[next(iter(seen))]

    def end(self, session):
        row = self.slots.pop(session, None)
        if row is None:
            return False
        self.free.append(row)
        return True

    def remap_seen(self, old_labels, new_model):
        """Clicked items as model ids of a new vocab (those it lacks are forgotten)."""
        for row in self.slots.values():
            labels = [old_labels[i] if old_labels is not None else str(i) for i in self.seen[row]]
            self.seen[row] = {m: None for m in map(new_model.model_id, labels) if m is not None}


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = int(status)
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


class Job:
    """One request's clicks, stepped in one of the Stepper's calls."""

    __slots__ = ("clicks", "topk", "exclude", "future")

    def __init__(self, clicks, topk, exclude):
        self.clicks = clicks  # [(session, item)]
        self.topk = topk
        self.exclude = exclude
        self.future = Future()


class Stepper:
    """The worker thread that owns the model and the session table.

    Requests queue Jobs; each turn takes every queued job (up to max_batch clicks) and steps
    them in as few predictor calls as their sessions allow. `lock` guards the model and the
    store: a reload swaps the model under it, so a turn runs wholly on one model.
    """

    def __init__(self, model: Model, capacity, ttl_s, max_batch, on_call):
        self.model = model
        self.store = SessionStore(capacity, model.info.hidden_size, ttl_s)
        self.max_batch = max_batch
        self.on_call = on_call  # on_call(seconds, rows) after each predictor call
        self.lock = threading.Lock()
        self.queue = []
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="predictor", daemon=True)
        self.thread.start()

    def submit(self, job):
        with self.wakeup:
            if self.stopping:
                job.future.set_exception(RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping"))
                return job.future
            self.queue.append(job)
            self.wakeup.notify()
        return job.future

    def stop(self):
        """Finish the queued jobs, then end the thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()

    def _take(self):
        with self.wakeup:
            while not self.queue and not self.stopping:
                self.wakeup.wait()
            taken, clicks = [], 0
            while self.queue and (not taken or clicks + len(self.queue[0].clicks) <= self.max_batch):
                job = self.queue.pop(0)
                taken.append(job)
                clicks += len(job.clicks)
            return taken

    def _loop(self):
        while True:
            jobs = self._take()
            if not jobs:
                return  # stopping, and nothing left
            try:
                with self.lock:
                    self._run(jobs)
            except Exception as exc:  # a bug: fail these requests, keep serving
                log.exception("stepping %d request(s) failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _run(self, jobs):
        """Check each job's items on the current model, then step the good ones in groups whose
        sessions all fit in the store at once."""
        model = self.model
        ready, group, sessions = [], [], set()
        for job in jobs:
            try:
                items = self._model_ids(model, job.clicks)
            except RequestError as exc:
                job.future.set_exception(exc)
                continue
            mine = {s for s, _ in job.clicks}
            if len(mine) > self.store.capacity:
                job.future.set_exception(RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(mine)} sessions in one request; the server keeps at "
                                                         f"most {self.store.capacity} (max_sessions / max_state_mb)"))
                continue
            if len(sessions | mine) > self.store.capacity:
                ready.append(group)
                group, sessions = [], set()
            group.append((job, items))
            sessions |= mine
        ready.append(group)
        for group in ready:
            if group:
                answers = self.step(model, group)
                for job, _ in group:
                    job.future.set_result(answers[id(job)])

    @staticmethod
    def _model_ids(model, clicks):
        items = np.empty(len(clicks), dtype=np.int64)
        unknown = []
        for i, (_, item) in enumerate(clicks):
            model_id = model.model_id(item)
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
        return items

    def step(self, model, group):
        """Step every click of the group's jobs, in order; returns {id(job): [answer per click]}.

        A session clicked several times (in one job or in several) is stepped once per "wave":
        its n-th click in the n-th predictor call, so the results equal sending the clicks one by
        one in queue order. Rows are taken for all clicks first, so that no wave evicts a session
        of the group (the group's sessions fit in the store)."""
        owners, sessions, items, exclude = [], [], [], []
        for job, job_items in group:
            for (session, _), item in zip(job.clicks, job_items):
                owners.append(job)
                sessions.append(session)
                exclude.append(job.exclude)
            items.append(job_items)
        items = np.concatenate(items)
        wave = np.empty(len(sessions), dtype=np.int64)
        count = {}
        for i, s in enumerate(sessions):
            wave[i] = count.get(s, 0)
            count[s] = wave[i] + 1
        store, padding = self.store, model.info.padding_id
        now = time.monotonic()
        store.expire(now)
        rows = np.array([store.slot(s, now) for s in sessions], dtype=np.int64)
        answers = {id(job): [] for job, _ in group}
        for w in range(int(wave.max()) + 1):
            idx = np.flatnonzero(wave == w)
            r = rows[idx]
            for i in idx:
                store.remember(rows[i], int(items[i]))
            excluded = [list(store.seen[rows[i]]) if exclude[i] else [] for i in idx]
            width = max(1, max(map(len, excluded)))
            exclude_ids = np.full((len(idx), width), padding, dtype=np.int64)
            for j, ids in enumerate(excluded):
                exclude_ids[j, :len(ids)] = ids
            started = time.perf_counter()
            top_ids, top_scores, next_hidden = model.step(items[idx], store.states[r], exclude_ids)
            self.on_call(time.perf_counter() - started, len(idx))
            store.states[r] = next_hidden
            store.clicks[r] += 1
            n_clicks = store.clicks[r].tolist()
            names = model.labels_of(top_ids).tolist()
            finite = np.isfinite(top_scores)  # excluded and never-clicked items score -inf
            scores = top_scores.tolist()
            for j, i in enumerate(idx):
                k = owners[i].topk
                keep = int(finite[j, :k].sum())  # -inf ones sort last
                answers[id(owners[i])].append((i, {"session": sessions[i], "clicks": n_clicks[j],
                                                   "items": names[j][:keep], "scores": scores[j][:keep]}))
        return {key: [answer for _, answer in sorted(found, key=lambda pair: pair[0])]
                for key, found in answers.items()}

    def swap(self, model, capacity):
        """Serve `model` from the next turn on. States are kept when the hidden size is unchanged."""
        with self.lock:
            old, store = self.model, self.store
            kept = len(store)
            if model.info.hidden_size == old.info.hidden_size and capacity == store.capacity:
                if model.info.labels != old.info.labels or model.info.n_items != old.info.n_items:
                    store.remap_seen(old.info.labels, model)
            else:
                log.warning("the new model's state has %d floats, the old one's %d: dropping the %d live sessions' "
                            "states", model.info.hidden_size, old.info.hidden_size, kept)
                fresh = SessionStore(capacity, model.info.hidden_size, store.ttl_s)
                fresh.evicted = store.evicted
                self.store = fresh
                kept = 0
            self.model = model
        return kept


# ---- the service ---------------------------------------------------------------------------------

class Recommender:
    """Validates requests and hands their clicks to the Stepper; health, metrics and reload."""

    def __init__(self, model: Model, runner: dict, prefix: str):
        self.runner = runner
        self.prefix = prefix
        self.topk = runner["topk"]
        self.exclude_seen = runner["exclude_seen"]
        self.max_batch = runner["max_batch"]
        self.started = time.time()
        self.ready = True
        self.counts = {"requests": 0, "clicks": 0, "client_errors": 0, "server_errors": 0, "predictor_calls": 0,
                       "predictor_s": 0.0, "reloads": 0, "reload_failures": 0}
        self.counts_lock = threading.Lock()
        self.reload_lock = threading.Lock()
        self.metrics = Metrics(self)
        capacity = state_capacity(runner, model.info.hidden_size, prefix)
        self.stepper = Stepper(model, capacity, runner["session_ttl_s"], runner["max_batch"], self._on_call)

    @property
    def model(self) -> Model:
        return self.stepper.model

    def _on_call(self, seconds, rows):
        with self.counts_lock:
            self.counts["predictor_calls"] += 1
            self.counts["predictor_s"] += seconds
        self.metrics.predictor.observe(seconds)
        self.metrics.predictor_rows.observe(rows)

    def count(self, key, n=1):
        with self.counts_lock:
            self.counts[key] += n

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

    def parse_options(self, body):
        k = body.get("topk", self.topk)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.topk:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"topk must be an integer from 1 to {self.topk}, got {k!r}")
        exclude = body.get("exclude_seen", self.exclude_seen)
        if not isinstance(exclude, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"exclude_seen must be true or false, got {exclude!r}")
        return k, exclude

    def click_job(self, body):
        session, item = self.parse_click(body)
        return Job([(session, item)], *self.parse_options(body))

    def batch_job(self, body):
        if not isinstance(body, dict) or not isinstance(body.get("clicks"), list):
            raise RequestError(HTTPStatus.BAD_REQUEST, 'the body must be {"clicks": [{"session": ..., "item": ...}, ...]}')
        raw = body["clicks"]
        if not raw:
            raise RequestError(HTTPStatus.BAD_REQUEST, "clicks is empty")
        if len(raw) > self.max_batch:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(raw)} clicks; a batch holds at most {self.max_batch} (max_batch)")
        clicks = [self.parse_click(c, f"clicks[{i}].") for i, c in enumerate(raw)]
        return Job(clicks, *self.parse_options(body))

    def run(self, job):
        """Step a job and wait for it (callers outside the event loop, e.g. tests)."""
        answers = self.stepper.submit(job).result()
        self.count("clicks", len(job.clicks))
        return answers

    def click(self, body):
        return self.run(self.click_job(body))[0]

    def batch(self, body):
        return {"results": self.run(self.batch_job(body))}

    def end(self, body):
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, 'the body must be {"session": ...}')
        session = _id_text(_field(body, "session", ""), "session")
        with self.stepper.lock:
            ended = self.stepper.store.end(session)
        return {"session": session, "ended": ended}

    def health(self):
        with self.stepper.lock:
            store, model = self.stepper.store, self.stepper.model
            store.expire(time.monotonic())
            sessions, capacity, evicted = len(store), store.capacity, sum(store.evicted.values())
        with self.counts_lock:
            counts = dict(self.counts)
        info = model.info
        return dict(status="ok", ready=self.ready, model=info.folder, epoch=info.epoch, n_items=info.n_items,
                    topk=self.topk, exclude_seen=self.exclude_seen, vocab=info.labels is not None, sessions=sessions,
                    max_sessions=capacity, evicted=evicted, uptime_s=round(time.time() - self.started, 3), **counts)

    # -- reload
    def reload(self):
        """Load the newest export under init_model_path and serve it from the next predictor call.

        Returns the answer of POST /reload; RequestError (409) when a reload is already running
        or the export is refused (damaged, another interface): the current model keeps serving."""
        if not self.reload_lock.acquire(blocking=False):
            raise RequestError(HTTPStatus.CONFLICT, "a reload is already running")
        try:
            runner, prefix = self.runner, self.prefix
            current = self.model
            try:
                folder = exports.newest_export(runner["init_model_path"], f"{prefix}.init_model_path")
                info = exports.read_export(folder)
                if info.folder == current.folder and info.io == current.info.io:
                    return {"reloaded": False, "model": info.folder, "epoch": info.epoch,
                            "reason": "the newest export is the one served"}
                if self.topk > info.topk:
                    raise ConfigError(f"{prefix}.topk", f"{self.topk}, but the model in {info.folder} returns "
                                                        f"{info.topk} items")
                capacity = state_capacity(runner, info.hidden_size, prefix)
                model = Model(info, runner["threads"], runner["device"])
            except UserError as exc:
                self.count("reload_failures")
                self.metrics.reloads.labels("refused").inc()
                log.error("reload refused, still serving %s: %s", current.folder, exc)
                raise RequestError(HTTPStatus.CONFLICT, f"reload refused, still serving {current.folder}: {exc}") from None
            kept = self.stepper.swap(model, capacity)
            self.count("reloads")
            self.metrics.reloads.labels("done").inc()
            log.info("reloaded: serving %s (epoch %d) instead of %s; %d live sessions kept", info.folder, info.epoch,
                     current.folder, kept)
            return {"reloaded": True, "model": info.folder, "epoch": info.epoch, "previous": current.folder,
                    "sessions_kept": kept}
        finally:
            self.reload_lock.release()

    def reload_logged(self):
        """SIGHUP: reload, the outcome in the log only."""
        try:
            answer = self.reload()
            if not answer["reloaded"]:
                log.info("reload: %s (%s)", answer["reason"], answer["model"])
        except RequestError as exc:
            if exc.status == HTTPStatus.CONFLICT and "already" in exc.message:
                log.warning("SIGHUP ignored: %s", exc.message)
        except Exception:  # a bug: the old model keeps serving
            log.exception("reload failed")

    def close(self):
        self.stepper.stop()


# ---- metrics -------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics of one service (its own registry: two services in a process don't mix)."""

    def __init__(self, service: Recommender):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("paddlerec_http_requests", "HTTP requests answered, by endpoint and status code",
                                ("endpoint", "code"), registry=self.registry)
        self.latency = Histogram("paddlerec_http_request_seconds", "Time to answer a request, by endpoint",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predictor = Histogram("paddlerec_predictor_seconds", "Time of one predictor call (GRU step and top-K "
                                   "of its rows)", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predictor_rows = Histogram("paddlerec_predictor_rows", "Clicks stepped by one predictor call",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024), registry=self.registry)
        self.reloads = Counter("paddlerec_reloads", "Model reloads, by result (done, refused)", ("result",),
                               registry=self.registry)
        self.registry.register(_StoreCollector(service))

    def text(self):
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _StoreCollector:
    """Sessions, evictions and the served model, read when scraped."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stepper = self.service.stepper
        with stepper.lock:
            store = stepper.store
            store.expire(time.monotonic())
            live, capacity, evicted = len(store), store.capacity, dict(store.evicted)
            info = stepper.model.info
        yield GaugeMetricFamily("paddlerec_sessions_live", "Sessions whose state the server keeps", value=live)
        yield GaugeMetricFamily("paddlerec_sessions_capacity", "Sessions the server can keep", value=capacity)
        family = CounterMetricFamily("paddlerec_sessions_evicted", "Sessions dropped: lru (the store was full), "
                                                                   "idle (session_ttl_s passed)", labels=("reason",))
        for reason, n in sorted(evicted.items()):
            family.add_metric((reason,), n)
        yield family
        family = GaugeMetricFamily("paddlerec_model_info", "The served export (value 1)", labels=("folder", "epoch"))
        family.add_metric((info.folder, str(info.epoch)), 1)
        yield family
        yield GaugeMetricFamily("paddlerec_ready", "1 when a model is loaded and the server is not draining",
                                value=1 if self.service.ready else 0)


# ---- HTTP (ASGI) -----------------------------------------------------------------------------------

class App:
    """The ASGI application: routes requests, answers JSON (or Prometheus text), counts them.

    Never raises: a bug becomes a JSON 500 with its traceback in the log. Bodies are read up to
    MAX_BODY_BYTES; a larger one is answered 413 and the HTTP layer discards the rest of it
    before the connection's next request, so the client never writes into a closed socket."""

    def __init__(self, service: Recommender):
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        endpoint = path if path in GET_ROUTES or path in POST_ROUTES else "other"
        service = self.service
        service.count("requests")
        content_type = "application/json"
        try:
            status, payload = await self._route(method, path, scope, receive)
        except _Disconnected:
            return  # nobody to answer
        except RequestError as exc:
            status, payload = exc.status, {"error": exc.message}
        except Exception as exc:  # a bug: keep serving, tell the client, log the traceback
            log.exception("%s %s failed", method, path)
            status, payload = 500, {"error": f"internal error ({type(exc).__name__}); see the server log"}
        if isinstance(payload, bytes):
            data, content_type = payload, "text/plain; version=0.0.4; charset=utf-8"
        else:
            data = json.dumps(payload).encode("utf-8")
        if 400 <= status < 500:
            service.count("client_errors")
        elif status >= 500:
            service.count("server_errors")
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())]
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            allow = "GET" if path in GET_ROUTES else "POST"
            headers.append((b"allow", allow.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        service.metrics.requests.labels(endpoint, str(status)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _route(self, method, path, scope, receive):
        service = self.service
        if method in ("GET", "HEAD") and path in GET_ROUTES:
            if path == "/health":
                return 200, service.health()
            if path == "/ready":
                if service.ready:
                    return 200, {"ready": True, "model": service.model.folder}
                return 503, {"ready": False, "error": "the server is draining (stopping)"}
            return 200, service.metrics.text()
        if method == "POST" and path in POST_ROUTES:
            data = await self._body(scope, receive)
            if path == "/reload":
                return 200, await asyncio.get_running_loop().run_in_executor(None, service.reload)
            try:
                body = json.loads(data)
            except (ValueError, RecursionError) as exc:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({exc})") from None
            if path == "/end":
                return 200, service.end(body)
            job = service.click_job(body) if path == "/click" else service.batch_job(body)
            answers = await asyncio.wrap_future(service.stepper.submit(job))
            service.count("clicks", len(job.clicks))
            return 200, answers[0] if path == "/click" else {"results": answers}
        if path in GET_ROUTES or path in POST_ROUTES:
            allowed = "GET" if path in GET_ROUTES else "POST"
            raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}, not {method}")
        raise RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {path}; endpoints: POST /click, /batch, /end, /reload; "
                                                 f"GET /health, /ready, /metrics")

    @staticmethod
    async def _body(scope, receive):
        for name, value in scope["headers"]:
            if name == b"content-length" and int(value) > MAX_BODY_BYTES:  # the HTTP layer checked it is a number
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"body of {int(value)} bytes; at most {MAX_BODY_BYTES}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:  # a chunked body: no length known in advance
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _Disconnected(Exception):
    pass


def _uvicorn_server_class():
    import uvicorn

    class UvicornServer(uvicorn.Server):
        """uvicorn's server with this service's signals: SIGTERM/SIGINT drain and stop (exit 0,
        not re-raised as uvicorn does), SIGHUP reloads the model."""

        service: Recommender = None

        def install_signal_handlers(self):  # older uvicorn versions
            pass

        @staticmethod
        def _previous(signals):
            return {sig: signal.getsignal(sig) for sig in signals}

        def capture_signals(self):
            server = self

            class Capture:
                def __enter__(self):
                    self.previous = {}
                    if threading.current_thread() is not threading.main_thread():
                        return
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        self.previous[sig] = signal.signal(sig, server.drain)
                    if hasattr(signal, "SIGHUP"):
                        self.previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, server.reload)

                def __exit__(self, *exc):
                    for sig, handler in self.previous.items():
                        signal.signal(sig, handler)

            return Capture()

        def drain(self, signum, frame):
            if self.should_exit:  # a second Ctrl-C: do not wait for the requests in flight
                self.force_exit = True
            log.info("%s: draining (no new connections; requests in flight finish, at most %d s)",
                     signal.Signals(signum).name, DRAIN_S)
            self.service.ready = False
            self.should_exit = True

        def reload(self, signum, frame):
            threading.Thread(target=self.service.reload_logged, name="reload", daemon=True).start()

    return UvicornServer


class HttpServer:
    """The service on host:port behind uvicorn. The socket is bound at construction (so a busy
    port is an error before anything runs, and port 0 gets its number); serve() blocks until
    stop() or a signal."""

    def __init__(self, service: Recommender, host: str, port: int):
        import uvicorn

        self.service = service
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto given: asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and
        # with it on, an answer's body waits for the client's delayed ACK of its headers (~40 ms)
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socket.bind((host, port))
            self.socket.listen(1024)
        except OSError:
            self.socket.close()
            raise
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(App(service), http="h11", ws="none", lifespan="off", interface="asgi3",
                                log_config=None, access_log=False, server_header=False,
                                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=DRAIN_S,
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        self.server = _uvicorn_server_class()(config)
        self.server.service = service

    @property
    def url(self):
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    def serve(self):
        self.service.ready = True
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def stop(self):
        """Drain and stop as SIGTERM does, from any thread: /ready answers 503, no new connections,
        requests in flight finish."""
        self.service.ready = False
        self.server.should_exit = True


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
    if runner["device"] == "gpu":
        import paddle

        if not paddle.is_compiled_with_cuda():
            raise ConfigError(f"{prefix}.device", "gpu, but the installed paddlepaddle has no CUDA support; "
                                                  "set `device: cpu` or install the GPU build")
    model = load_model(runner["init_model_path"], f"{prefix}.init_model_path", runner["threads"], runner["device"],
                       runner["topk"], prefix)
    service = Recommender(model, runner, prefix)
    info = model.info
    capacity = service.stepper.store.capacity
    log.info("serving %s (epoch %d, %d items, vocab: %s); keeping up to %d sessions (%.1f MB of state), idle ones "
             "for %s", info.folder, info.epoch, info.n_items, "yes" if info.labels is not None else "no (model ids)",
             capacity, capacity * 4 * info.hidden_size / 2 ** 20,
             f"{runner['session_ttl_s']:g} s" if runner["session_ttl_s"] else "ever")
    return service


def serve_runner(config: Config, runner_name, on_ready=None):
    """Answer HTTP until Ctrl-C or SIGTERM (which drain: requests in flight finish). on_ready(url)
    is called once the port is open."""
    runner = config.runners[runner_name]
    service = build_service(config, runner_name)
    try:
        try:
            server = HttpServer(service, runner["host"], runner["port"])
        except OSError as exc:
            raise ConfigError(f"runner.{runner_name}.port", f"cannot listen on {runner['host']}:{runner['port']} "
                                                            f"({exc.strerror or exc}); pick another host or port") from None
        log.info("listening on %s (POST /click, /batch, /end, /reload; GET /health, /ready, /metrics); Ctrl-C or "
                 "SIGTERM stops, SIGHUP reloads the newest export", server.url)
        if on_ready is not None:
            on_ready(server.url)
        server.serve()
    finally:
        service.close()
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
        description="Serve next-click recommendations for live sessions over HTTP from an exported inference model.")
    parser.add_argument("-m", "--model", required=True, metavar="CONFIG",
                        help="config YAML, or a folder holding config.yaml")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. runner.serve_runner.max_sessions=1000. Repeatable.")
    parser.add_argument("--runner", default="", metavar="NAME", help="the serve runner to use (default: the only one)")
    parser.add_argument("--host", default=None, metavar="ADDRESS",
                        help="address to listen on (overrides the runner's; 0.0.0.0: every interface)")
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
        if args.host is not None:
            overrides.append(f"runner.{name}.host={json.dumps(args.host)}")
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
    except KeyboardInterrupt:  # before the server was up (once up, Ctrl-C drains it)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
