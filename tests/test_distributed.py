"""Distributed training (paddlerec/launch.py, paddlerec/worker.py): 2 workers on the sample data, a dying worker,
two "machines" on 127.0.0.1, the parameter-server check, and the gradient reducer's arithmetic.

The multi-process tests start real paddle.distributed.launch jobs (3-6 Python processes each);
the whole file takes about 60-80 s on 2 shared cores.
"""

import os
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from tests.helpers import PYTHON, REPO, hparams, make_model, random_sessions, run_cli, steps_of

MODEL = os.path.join(REPO, "model.py")
READER = os.path.join(REPO, "rsc15_reader.py")


def write_config(tmp_path, runners, mode, model=MODEL, batch_size=16, threads=2,
                 data=f"{REPO}/data/sample_paddlerec"):
    """A config on PaddleRec's sample data (data/sample_paddlerec), or on `data`/train and `data`/test,
    whose every output lands under tmp_path."""
    text = f"""
workspace: "{REPO}"
dataset:
- name: train
  batch_size: {batch_size}
  data_path: "{data}/train"
  data_converter: "{READER}"
- name: test
  batch_size: 64
  data_path: "{data}/test"
  data_converter: "{READER}"
hyper_parameters:
  layers: [16]
  n_sample: 32
  dropout_hidden: 0.2
  optimizer: {{class: adagrad, learning_rate: 0.1, momentum: 0.1}}
phase:
- {{name: train, model: "{model}", dataset_name: train, thread_num: {threads}}}
- {{name: test, model: "{model}", dataset_name: test, thread_num: {threads}}}
mode: {mode}
runner:
{runners}
"""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def distributed_runner(tmp_path, name, cls, extra="", epochs=2, log_dir=None):
    return f"""- name: {name}
  class: {cls}
  epochs: {epochs}
  save_checkpoint_interval: 1
  save_checkpoint_path: "{tmp_path}/checkpoints"
  save_inference_interval: {epochs}
  save_inference_path: "{tmp_path}/inference"
  log_dir: "{log_dir or tmp_path / 'log'}"
  start_timeout: 120
  phases: [train]
{extra}"""


def infer_runner(tmp_path):
    return f"""- name: infer
  class: infer
  init_model_path: "{tmp_path}/checkpoints"
  predictions_path: "{tmp_path}/predictions"
  phases: [test]
"""


def incremental_runner(tmp_path):
    return f"""- name: more
  class: train
  epochs: 1
  init_model_path: "{tmp_path}/checkpoints"
  save_checkpoint_path: "{tmp_path}/checkpoints"
  phases: [train]
"""


def read_status(log_dir, local_index):
    import json

    with open(os.path.join(log_dir, f"status.{local_index}.json"), encoding="utf-8") as f:
        return json.load(f)


def checkpoint_digest(path):
    """The digest the workers report, recomputed from a saved checkpoint's files."""
    import paddle

    from paddlerec.worker import state_digest

    return state_digest(paddle.load(os.path.join(path, "model.pdparams")),
                        paddle.load(os.path.join(path, "optimizer.pdopt")))


def processes_mentioning(text):
    """PIDs (other than this test's) whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue  # the process ended while we looked
    return found


LEFTOVER_GUARD_SECONDS = 60  # only bounds a hang; a correct job's processes are gone within a moment


def assert_no_leftovers(marker):
    """Every process of the job ends (waited for as it happens, not for a fixed time)."""
    leftovers = processes_mentioning(marker)
    deadline = time.monotonic() + LEFTOVER_GUARD_SECONDS
    while leftovers and time.monotonic() < deadline:  # one may be between its last write and its exit
        time.sleep(0.1)
        leftovers = processes_mentioning(marker)
    assert leftovers == [], f"processes of the job still running: {leftovers}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="process checks read /proc (Linux)")
def test_two_workers_keep_identical_parameters_and_their_checkpoint_serves_infer_and_incremental(tmp_path):
    runners = distributed_runner(tmp_path, "dist", "local_cluster_train", "  worker_num: 2\n  eval_phase: test\n") + \
        infer_runner(tmp_path) + incremental_runner(tmp_path)
    config = write_config(tmp_path, runners, "[dist, infer, more]")
    result = run_cli(["-m", "paddlerec.run", "-m", config, "--no-progress"], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    log_dir = str(tmp_path / "log")
    workers = [read_status(log_dir, i) for i in range(2)]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert all(w["state"] == "done" and w["world"] == 2 for w in workers)
    assert workers[0]["token"] == workers[1]["token"]
    # both trained (each its own shard) and ended bit-identical, equal to what the chief saved
    assert workers[0]["digest"] == workers[1]["digest"]
    saved = checkpoint_digest(str(tmp_path / "checkpoints" / "2"))
    assert saved == workers[0]["digest"]
    epochs = workers[0]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["events"] > 0 for e in epochs)

    # training moved the parameters away from the initial ones
    import paddle

    import model as model_module

    state = paddle.load(str(tmp_path / "checkpoints" / "2" / "model.pdparams"))
    from paddlerec.contract import DataInfo

    fresh = model_module.Model(hparams(layers=[16], n_sample=32), DataInfo(n_items=state["item_emb"].shape[0]))
    assert not np.allclose(state["gru0_w_hh"].numpy(), fresh.network.gru0_w_hh.numpy())

    # only worker 0 evaluates and saves; infer, the inference export and incremental training use it unchanged
    import json

    with open(tmp_path / "checkpoints" / "curves.json", encoding="utf-8") as f:
        rows = json.load(f)[:2]  # the incremental runner appends epoch 3
    assert [r["epoch"] for r in rows] == [1, 2] and all(any(k.startswith("recall@") for k in r) for r in rows)
    chief_log, other_log = ((tmp_path / "log" / f"workerlog.{i}").read_text() for i in (0, 1))
    assert "eval on test" in chief_log and "eval on test" not in other_log
    assert "saved checkpoint" in chief_log and "saved checkpoint" not in other_log
    assert "infer test, epoch 2" in result.stderr
    assert os.path.isfile(tmp_path / "predictions" / "2.txt")
    assert os.path.isfile(tmp_path / "inference" / "2" / "model.json")
    assert "continuing from" in result.stderr and os.path.isdir(tmp_path / "checkpoints" / "3")
    assert_no_leftovers(str(tmp_path))


def test_parameter_server_strategy_stops_before_anything_starts(tmp_path):
    runners = distributed_runner(tmp_path, "dist", "local_cluster_train",
                                 "  distribute_strategy: async\n  server_num: 1\n")
    config = write_config(tmp_path, runners, "[dist]")
    result = run_cli(["-m", "paddlerec.run", "-m", config, "--no-progress", "-q"], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and "warn" not in l.lower()
             and "OMP_NUM_THREADS" not in l and "PLEASE USE" not in l]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: runner.dist.distribute_strategy:")
    assert "parameter-server" in lines[0] and "distribute_strategy: sync" in lines[0] and "geo" in lines[0]
    import paddle.base.core as core

    if not hasattr(core, "DistFleetWrapper"):  # this wheel: the message says what is missing
        assert "DistFleetWrapper" in lines[0]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "log"), "nothing may start before the check"


@pytest.mark.parametrize("runner_class,extra,key,words", [
    ("local_cluster_train", "  server_num: 2\n", "runner.dist.server_num", "no parameter servers"),
    ("cluster_train", "  nnodes: 2\n", "runner.dist.master", "PADDLE_MASTER"),
    ("cluster_train", "  master: \"10.0.0.1\"\n  nnodes: 2\n", "runner.dist.master", "HOST:PORT"),
    ("cluster_train", "  master: \"10.0.0.1:8090\"\n  nnodes: 2\n  node_rank: 2\n", "runner.dist.node_rank",
     "not below nnodes"),
])
def test_distributed_settings_are_checked_before_anything_starts(tmp_path, monkeypatch, runner_class, extra, key,
                                                                 words):
    from paddlerec.config import load_config
    from paddlerec.errors import ConfigError
    from paddlerec.loops import RunContext
    from paddlerec.mode import prepare

    for name in ("PADDLE_MASTER", "PADDLE_NNODES", "PADDLE_RANK", "PADDLE_NPROC_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(write_config(tmp_path, distributed_runner(tmp_path, "dist", runner_class, extra), "[dist]"))
    with pytest.raises(ConfigError) as caught:
        prepare(RunContext(config, show_progress=False))
    assert str(caught.value).startswith(key + ":") and words in str(caught.value)


def test_cluster_settings_fall_back_to_the_launcher_variables(tmp_path):
    from paddlerec.config import load_config
    from paddlerec.launch import cluster_settings

    config = load_config(write_config(tmp_path, distributed_runner(tmp_path, "dist", "cluster_train"), "[dist]"))
    runner = config.runners["dist"]
    env = {"PADDLE_MASTER": "10.1.2.3:9000", "PADDLE_NNODES": "3", "PADDLE_RANK": "2",
           "PADDLE_NPROC_PER_NODE": "4", "POD_IP": "10.1.2.5"}
    assert cluster_settings("dist", runner, env) == {"master": "10.1.2.3:9000", "nnodes": 3, "node_rank": 2,
                                                     "nproc": 4, "host": "10.1.2.5"}
    runner = dict(runner, master="10.9.9.9:1234", nnodes=2, node_rank=0, nproc_per_node=1, host="10.9.9.8")
    assert cluster_settings("dist", runner, env) == {"master": "10.9.9.9:1234", "nnodes": 2, "node_rank": 0,
                                                     "nproc": 1, "host": "10.9.9.8"}


DYING_MODEL = """
import os
import signal

from model import *  # noqa: F401,F403
import model as base


class Model(base.Model):
    def train_step(self, batch, batch_size):
        if os.environ.get("PADDLE_TRAINER_ID") == "1":
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(batch, batch_size)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="process checks read /proc (Linux)")
def test_a_killed_worker_stops_the_job_with_its_log_named_and_nothing_left_running(tmp_path):
    model = tmp_path / "dying_model.py"
    model.write_text(DYING_MODEL)
    runners = distributed_runner(tmp_path, "dist", "local_cluster_train", epochs=3) + infer_runner(tmp_path)
    config = write_config(tmp_path, runners, "[dist, infer]", model=str(model))
    result = run_cli(["-m", "paddlerec.run", "-m", config, "--no-progress", "-q"], timeout=180)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("distributed error: runner.dist: worker 1 stopped without reporting an error")
    assert str(tmp_path / "log" / "workerlog.1") in last
    assert "infer test" not in result.stderr  # the next runner does not run
    assert read_status(str(tmp_path / "log"), 0)["state"] == "failed"
    assert_no_leftovers(str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="process checks read /proc (Linux)")
def test_cluster_train_on_two_hosts_at_localhost_with_geo_on_the_fused_kernel(tmp_path):
    port = free_port()
    processes = []
    for node in (0, 1):
        extra = (f"  master: \"127.0.0.1:{port}\"\n  nnodes: 2\n  node_rank: {node}\n  nproc_per_node: 1\n"
                 f"  distribute_strategy: geo\n  geo_steps: 4\n")
        runners = distributed_runner(tmp_path, "cluster", "cluster_train", extra, log_dir=tmp_path / f"log{node}") + \
            infer_runner(tmp_path)
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        config = write_config(folder, runners, "[cluster, infer]", threads=1)  # both "machines" share 2 cores
        processes.append(subprocess.Popen([PYTHON, "-m", "paddlerec.run", "-m", config, "--no-progress"], cwd=REPO,
                                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=240)[1])
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, err in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]

    node0, node1 = read_status(str(tmp_path / "log0"), 0), read_status(str(tmp_path / "log1"), 0)
    assert (node0["rank"], node1["rank"]) == (0, 1) and node0["world"] == node1["world"] == 2
    assert node0["digest"] == node1["digest"] == checkpoint_digest(str(tmp_path / "checkpoints" / "2"))
    for node in (0, 1):  # geo workers train with the fused kernel
        assert "training with Paddle operators" not in (tmp_path / f"log{node}" / "workerlog.0").read_text()
    # node 0 holds the checkpoints and runs the rest of mode; node 1 stops after training
    assert "infer test, epoch 2" in outputs[0]
    assert "ran on another machine" in outputs[1] and "infer test" not in outputs[1]
    assert_no_leftovers(str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="process checks read /proc (Linux)")
def test_cluster_train_stops_when_the_other_machine_never_joins(tmp_path):
    extra = f"  master: \"127.0.0.1:{free_port()}\"\n  nnodes: 2\n  node_rank: 0\n  nproc_per_node: 1\n"
    runners = distributed_runner(tmp_path, "cluster", "cluster_train", extra).replace("start_timeout: 120",
                                                                                       "start_timeout: 8")
    config = write_config(tmp_path, runners, "[cluster]")
    result = run_cli(["-m", "paddlerec.run", "-m", config, "--no-progress", "-q"], timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("distributed error: runner.cluster: the workers did not meet within start_timeout (8 s)")
    assert "all 2 machines" in last
    assert_no_leftovers(str(tmp_path))


class ThreadComm:
    """Collectives between two threads of this process: a stand-in for two workers."""

    def __init__(self, shared, rank):
        self.shared, self.rank, self.world = shared, rank, 2

    def _exchange(self, value):
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait()
        values = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return values

    def all_reduce_sum(self, tensor):
        import paddle

        return paddle.to_tensor(sum(self._exchange(tensor.numpy())))

    def all_gather(self, tensor):
        import paddle

        return [paddle.to_tensor(v) for v in self._exchange(tensor.numpy())]


@pytest.mark.parametrize("path", ["host", "tensors"])
def test_reducer_averages_dense_gradients_and_gathers_sparse_rows_of_unequal_lengths(monkeypatch, path):
    import paddle

    from paddlerec.worker import SyncReducer

    if path == "tensors":  # what GPU tensors take (NCCL): Paddle operators instead of numpy
        monkeypatch.setattr(SyncReducer, "_combine", SyncReducer._combine_tensors)

    rng = np.random.default_rng(7)
    inputs = []
    for m in (5, 2):  # the workers touch different numbers of item rows
        dense = {"w": paddle.to_tensor(rng.normal(size=(3, 6)).astype("float32")),
                 "b": paddle.to_tensor(rng.normal(size=6).astype("float32"))}
        sparse = {"item_emb": (rng.integers(0, 50, m), paddle.to_tensor(rng.normal(size=(m, 4)).astype("float32"))),
                  "item_bias": (rng.integers(0, 50, m + 3), paddle.to_tensor(rng.normal(size=m + 3).astype("float32")))}
        inputs.append((dense, sparse))
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=30)}
    outputs = [None, None]

    def worker(rank):
        outputs[rank] = SyncReducer(ThreadComm(shared, rank))(*inputs[rank])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in outputs)

    for name in ("w", "b"):
        expected = (inputs[0][0][name].numpy() + inputs[1][0][name].numpy()) / 2
        for dense, _ in outputs:
            np.testing.assert_allclose(dense[name].numpy(), expected, rtol=1e-6)
            assert list(dense[name].shape) == list(inputs[0][0][name].shape)
    for name in ("item_emb", "item_bias"):
        rows = np.concatenate([inputs[0][1][name][0], inputs[1][1][name][0]])
        grads = np.concatenate([inputs[0][1][name][1].numpy(), inputs[1][1][name][1].numpy()]) / 2
        for _, sparse in outputs:
            np.testing.assert_array_equal(sparse[name][0], rows)
            np.testing.assert_allclose(sparse[name][1].numpy(), grads, rtol=1e-6)
        # both workers apply the very same update
        np.testing.assert_array_equal(outputs[0][1][name][1].numpy(), outputs[1][1][name][1].numpy())


def test_lockstep_cut_keeps_a_prefix_of_whole_mini_batches():
    import rsc15_reader

    batch = next(iter(steps_of(random_sessions(40, 30, seed=3), batch_size=8, chunk=20)))
    assert batch.n_steps > 5
    head = batch.head(5)  # what LockstepReader cuts its epochs with
    assert head.n_steps == 5
    rows = int(batch.step_offsets[5])
    np.testing.assert_array_equal(head.step_offsets, batch.step_offsets[:6])
    for name in ("inputs", "targets", "carry", "sessions"):
        np.testing.assert_array_equal(getattr(head, name), getattr(batch, name)[:rows])
    np.testing.assert_array_equal(head.step_events, batch.step_events[:5])
    assert isinstance(head, rsc15_reader.StepBatch)


def run_in_threads(work, world=2):
    """work(rank) in `world` threads; their results in rank order (a thread's exception is re-raised)."""
    results, errors = [None] * world, []

    def target(rank):
        try:
            results[rank] = work(rank)
        except BaseException as exc:  # noqa: B902 (handed to the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_sync_exchange_is_one_collective_per_step_once_the_capacity_is_agreed():
    import paddle

    from paddlerec.worker import SyncReducer

    seed = 19
    rng = np.random.default_rng(seed)
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=30)}
    reducers = [SyncReducer(ThreadComm(shared, r)) for r in range(2)]

    def step(rank, m):
        dense = {"w": paddle.to_tensor(rng.normal(size=(2, 3)).astype("float32"))}
        sparse = {"emb": (rng.integers(0, 9, m), paddle.to_tensor(rng.normal(size=(m, 2)).astype("float32")))}
        return reducers[rank](dense, sparse)

    run_in_threads(lambda r: step(r, 6 + r))  # the first exchange agrees on a capacity: header, then buffers
    first = [r.gather.collectives for r in reducers]
    for m in (5, 3, 0):  # shorter buffers, a worker without rows: one all-gather each
        out = run_in_threads(lambda r: step(r, m if r else 4))
        for name in ("emb",):
            np.testing.assert_array_equal(out[0][1][name][0], out[1][1][name][0])
            np.testing.assert_array_equal(out[0][1][name][1].numpy(), out[1][1][name][1].numpy())
    assert first == [2, 2], f"seed {seed}"
    assert [r.gather.collectives for r in reducers] == [5, 5], f"seed {seed}"


@pytest.mark.parametrize("in_place,every_row", [(True, False), (False, False), (True, True)],
                         ids=["in-place", "copies", "every-row-touched"])
def test_geo_exchange_averages_changes_over_the_workers_that_touched_each_row(monkeypatch, in_place, every_row):
    from paddlerec import worker
    from paddlerec.worker import GeoAverager

    if not in_place:  # what a GPU tensor gets: copies out, set_value / load_optimizer_state back
        monkeypatch.setattr(worker, "_host_array", lambda tensor: (tensor.numpy(), False))
    seed = 11
    rng = np.random.default_rng(seed)
    n_items = 20
    sessions = random_sessions(30, n_items, seed=1)
    models = [make_model(sessions, n_items=n_items, layers=[8], n_sample=4, kernel="reference",
                         optimizer={"momentum": 0.5}) for _ in range(2)]
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=30)}
    averagers = [GeoAverager(ThreadComm(shared, r), n_items, every=4) for r in range(2)]
    for averager, model in zip(averagers, models):
        averager.attach(model)
        averager.snapshot()
    base = {**{k: v.numpy().copy() for k, v in models[0].network.state_dict().items()},
            **{k: v.numpy().copy() for k, v in models[0].optimizer_state().items()}}
    touched = [np.arange(n_items) if every_row else np.array([1, 2, 5]), np.array([2, 7])]
    changes = [{}, {}]
    for r, model in enumerate(models):  # what K local steps would have done: changed rows and dense tensors
        for name in ("item_emb", "item_bias", "item_emb.acc", "item_emb.mom", "gru0_w_hh", "gru0_w_hh.acc"):
            tensor = (model.optimizer.state if "." in name else model.network.state_dict())[name]
            change = np.zeros(tensor.shape, np.float32)
            if name.startswith("item_"):
                change[touched[r]] = rng.normal(size=(len(touched[r]),) + tuple(tensor.shape[1:]))
            else:
                change[:] = rng.normal(size=tensor.shape)
            changes[r][name] = change
            tensor.set_value(tensor.numpy() + change)
    run_in_threads(lambda r: averagers[r].exchange())

    states = [{**{k: v.numpy() for k, v in m.network.state_dict().items()},
               **{k: v.numpy() for k, v in m.optimizer_state().items()}} for m in models]
    for name in sorted(states[0]):  # every worker ends with the very same state
        np.testing.assert_array_equal(states[0][name], states[1][name], err_msg=f"{name}, seed {seed}")
    for name in changes[0]:
        expected = base[name].copy()
        if name.startswith("item_"):  # each row: its mean change over the workers that touched it
            for row in range(n_items):
                by = [r for r in range(2) if row in touched[r]]
                if by:
                    expected[row] += sum(changes[r][name][row] for r in by) / len(by)
        else:
            expected += (changes[0][name] + changes[1][name]) / 2
        np.testing.assert_allclose(states[0][name], expected, rtol=1e-5, atol=1e-6, err_msg=f"{name}, seed {seed}")
    untouched = [i for i in range(n_items) if not any(i in t for t in touched)]
    np.testing.assert_array_equal(states[0]["item_emb"][untouched], base["item_emb"][untouched])
    if not every_row:
        assert untouched


def test_geo_cuts_the_epoch_every_k_steps_and_exchanges_there_and_at_its_end():
    from paddlerec.worker import GeoAverager

    class Recording(GeoAverager):
        def snapshot(self):
            self.trained = 0
            self.exchanged_at = []

        def exchange(self):
            self.exchanged_at.append(self.trained)

    batches = list(steps_of(random_sessions(50, 30, seed=4), batch_size=6, chunk=7))
    total = sum(b.n_steps for b in batches)
    assert total > 20
    averager = Recording(comm=None, n_items=30, every=5)
    for part in averager.epoch(iter(batches)):
        averager.trained += part.n_steps  # the train loop's step
        assert part.n_steps <= 5
    assert averager.exchanged_at == list(range(5, total, 5)) + [total]
    assert averager.trained == total


def test_cutting_batches_at_step_boundaries_trains_the_same_with_the_fused_kernel():
    from csrc import kernel as fused_ops

    try:
        fused_ops.load()
    except fused_ops.KernelUnavailable as exc:
        pytest.skip(f"the fused kernel could not be built here: {exc}")
    sessions = random_sessions(60, 40, seed=5)

    def train(cut):
        model = make_model(sessions, layers=[8], n_sample=8, kernel="fused", optimizer={"momentum": 0.3})
        model.begin_epoch(1, True)
        losses = []
        for batch in steps_of(sessions, batch_size=4, chunk=10):
            parts = [batch.part(lo, min(batch.n_steps, lo + 3)) for lo in range(0, batch.n_steps, 3)] if cut \
                else [batch]
            for part in parts:
                losses.append(model.train_step(part, 4))
        state = {k: v.numpy() for k, v in model.network.state_dict().items()}
        state.update({k: v.numpy() for k, v in model.optimizer_state().items()})
        return np.concatenate(losses), state

    whole_losses, whole = train(cut=False)
    cut_losses, cut = train(cut=True)
    np.testing.assert_array_equal(cut_losses, whole_losses)
    for name in whole:
        np.testing.assert_array_equal(cut[name], whole[name], err_msg=name)


def write_chain_sessions(folder, seed, n_items=60, n_train=300, n_test=60):
    """Learnable data: every session walks item ids upwards (s, s+1, s+2, ... mod n_items), so
    the next click is predictable; a model that learned nothing ranks it at random
    (Recall@20 about 20/60)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        os.makedirs(folder / split, exist_ok=True)
        lines = []
        for _ in range(count):
            start, length = int(rng.integers(n_items)), int(rng.integers(3, 9))
            lines.append(" ".join(str((start + i) % n_items) for i in range(length)))
        (folder / split / "sessions.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


INFER_LINE = r"infer test, epoch (\d+) .*Recall@20: ([0-9.]+).*MRR@20: ([0-9.]+)"


def train_two_workers(tmp_path, strategy, data, epochs=3):
    """A local_cluster_train run of 2 workers and the infer runner: (Recall@20, the workers' statuses, stderr)."""
    import re

    extra = f"  worker_num: 2\n  distribute_strategy: {strategy[0]}\n  geo_steps: {strategy[1]}\n"
    runners = distributed_runner(tmp_path, "dist", "local_cluster_train", extra, epochs=epochs) + \
        infer_runner(tmp_path)
    config = write_config(tmp_path, runners, "[dist, infer]", batch_size=8, data=data)
    result = run_cli(["-m", "paddlerec.run", "-m", config, "--no-progress"], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.findall(INFER_LINE, result.stderr)
    assert found and int(found[-1][0]) == epochs, result.stderr[-2000:]
    statuses = [read_status(str(tmp_path / "log"), i) for i in range(2)]
    return float(found[-1][1]), statuses, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="process checks read /proc (Linux)")
def test_geo_workers_train_with_the_fused_kernel_and_end_every_epoch_identical(tmp_path):
    seed = 23
    data = write_chain_sessions(tmp_path / "data", seed)
    recall, statuses, _ = train_two_workers(tmp_path, ("geo", 3), data)
    assert all(s["state"] == "done" for s in statuses)
    assert statuses[0]["digest"] == statuses[1]["digest"] == checkpoint_digest(str(tmp_path / "checkpoints" / "3"))
    epochs = statuses[0]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(np.isfinite(e["loss"]) and e["events"] > 0 for e in epochs)
    assert epochs[-1]["loss"] < epochs[0]["loss"], f"seed {seed}: {[e['loss'] for e in epochs]}"
    assert recall > 0.6, f"seed {seed}: Recall@20 {recall} (a model that learned nothing: about 0.33)"
    worker_logs = [(tmp_path / "log" / f"workerlog.{i}").read_text() for i in (0, 1)]
    assert all("geo_steps 3" in text for text in worker_logs)
    assert not any("training with Paddle operators" in text for text in worker_logs)  # geo keeps the fused step
    assert_no_leftovers(str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="process checks read /proc (Linux)")
def test_geo_every_step_and_sync_both_learn_but_are_different_algorithms(tmp_path):
    seed = 29
    data = write_chain_sessions(tmp_path / "data", seed)
    runs = {}
    for strategy in (("geo", 1), ("sync", 8)):
        folder = tmp_path / strategy[0]
        folder.mkdir()
        runs[strategy[0]] = train_two_workers(folder, strategy, data, epochs=2)
    for name, (recall, statuses, _) in runs.items():
        assert statuses[0]["digest"] == statuses[1]["digest"], name
        assert recall > 0.6, f"{name}, seed {seed}: Recall@20 {recall} (a model that learned nothing: about 0.33)"
    # geo with K=1 averages the workers' updates (parameters and slots), sync their gradients
    assert runs["geo"][1][0]["digest"] != runs["sync"][1][0]["digest"]
