"""The fused C++ training step must do the arithmetic of the reference (Paddle operators) step."""

import numpy as np
import pytest

from csrc import kernel as fused_ops

from tests.helpers import make_model, random_sessions, steps_of

model_module = pytest.importorskip("model")
import rsc15_reader  # noqa: E402


def fused_available():
    try:
        fused_ops.load()
        return True
    except fused_ops.KernelUnavailable:
        return False


pytestmark = pytest.mark.skipif(not fused_available(), reason="the fused kernel could not be built here")

CASES = {
    "xe-shared-logq-momentum": dict(loss="cross-entropy", logq=1.0, optimizer={"momentum": 0.3}),
    "xe-two-layers": dict(loss="cross-entropy", layers=[12, 8], optimizer={"momentum": 0.1}),
    "bprmax-elu-bpreg": dict(loss="bpr-max", elu_param=0.5, bpreg=1.5, optimizer={"momentum": 0.4}),
    "top1max": dict(loss="top1-max", optimizer={"learning_rate": 0.05}),
    "separate-embedding": dict(embedding="separate", embedding_size=6, optimizer={"momentum": 0.2}),
    "one-hot-input": dict(embedding="none", layers=[10, 8]),
    "full-softmax-sgd": dict(loss="full_softmax", optimizer={"class": "sgd", "learning_rate": 0.5, "momentum": 0.5}),
    "no-samples": dict(n_sample=0, loss="bpr-max"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference(case):
    sessions = random_sessions(n_sessions=40, n_items=30, seed=3)
    settings = {"layers": [8], "n_sample": 16, **CASES[case]}
    fused = make_model(sessions, kernel="fused", **settings)
    reference = make_model(sessions, kernel="reference", **settings)
    fused_losses, reference_losses = [], []
    for epoch in (1, 2):
        for model, losses in ((fused, fused_losses), (reference, reference_losses)):
            model.begin_epoch(epoch, True)
            for batch in steps_of(sessions, 5):
                losses.extend(model.train_step(batch, 5))
    assert len(fused_losses) == len(reference_losses) > 20
    np.testing.assert_allclose(fused_losses, reference_losses, rtol=2e-4, atol=1e-5)
    for name in fused.network.param_names:
        np.testing.assert_allclose(getattr(fused.network, name).numpy(), getattr(reference.network, name).numpy(),
                                   rtol=1e-3, atol=2e-5, err_msg=name)
    for key, value in fused.optimizer.state.items():
        np.testing.assert_allclose(value.numpy(), reference.optimizer.state[key].numpy(), rtol=1e-3, atol=2e-5,
                                   err_msg=key)


def test_fused_training_with_dropout_learns():
    """With dropout the two paths draw different masks, so no number-for-number comparison:
    the fused one must still drive the loss down."""
    sessions = random_sessions(n_sessions=60, n_items=25, seed=5)
    model = make_model(sessions, kernel="fused", layers=[16], dropout_embed=0.3, dropout_hidden=0.3, n_sample=8)
    losses = []
    for epoch in range(1, 6):
        model.begin_epoch(epoch, True)
        for batch in steps_of(sessions, 8):
            losses.extend(model.train_step(batch, 8))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < np.mean(losses[:20])


@pytest.mark.parametrize("embedding,layers", [("shared", [8]), ("separate", [6, 8]), ("none", [8])])
def test_fused_evaluation_matches_reference(embedding, layers):
    """Ranks, tie counts and top-K of the C++ evaluation equal those of the Paddle operators."""
    sessions = random_sessions(n_sessions=50, n_items=40, seed=11, min_len=1)
    trained = make_model(sessions, kernel="reference", layers=layers, embedding=embedding, n_sample=10)
    trained.begin_epoch(1, True)
    for batch in steps_of(rsc15_reader.drop_short(sessions, 2, "test"), 6):
        trained.train_step(batch, 6)
    # items 35.. never seen: masked out of every ranking and recommendation
    support = trained.network.item_support.numpy()
    support[35:] = 0
    trained.network.item_support.set_value(support)
    state = {k: v.numpy() for k, v in trained.network.state_dict().items()}
    outputs = {}
    for kernel in ("fused", "reference"):
        model = make_model(sessions, kernel=kernel, layers=layers, embedding=embedding)
        model.network.set_state_dict(state)
        outputs[kernel] = []
        for mode in ("standard", "conservative", "median"):
            model.begin_epoch(0, False)
            outputs[kernel] += [model.eval_step(b, 5, mode) for b in steps_of(sessions, 7, with_final=True)]
    for fused_out, reference_out in zip(outputs["fused"], outputs["reference"]):
        np.testing.assert_array_equal(fused_out.ranks, reference_out.ranks)
        np.testing.assert_array_equal(fused_out.query_ids, reference_out.query_ids)
        np.testing.assert_array_equal(fused_out.topk_ids, reference_out.topk_ids)
        np.testing.assert_allclose(fused_out.topk_scores, reference_out.topk_scores, rtol=1e-5, atol=1e-6)
        assert not np.isin(fused_out.topk_ids, np.arange(35, 40)).any()


def test_fused_matches_reference_when_work_is_split_between_threads():
    """Large enough mini-batches that the fused step splits its products and loss rows into many
    tiles (see Team in csrc/gru4rec_cpu.cc); evaluation large enough to split its rows."""
    sessions = random_sessions(n_sessions=700, n_items=4000, seed=8)
    settings = {"layers": [80], "n_sample": 1500, "loss": "cross-entropy", "logq": 0.5,
                "optimizer": {"momentum": 0.2}}
    fused = make_model(sessions, kernel="fused", **settings)
    reference = make_model(sessions, kernel="reference", **settings)
    losses = {}
    for name, model in (("fused", fused), ("reference", reference)):
        model.begin_epoch(1, True)
        losses[name] = [l for batch in steps_of(sessions, 128, chunk=64) for l in model.train_step(batch, 128)]
    np.testing.assert_allclose(losses["fused"], losses["reference"], rtol=2e-4, atol=1e-5)
    for name in fused.network.param_names:
        np.testing.assert_allclose(getattr(fused.network, name).numpy(), getattr(reference.network, name).numpy(),
                                   rtol=1e-3, atol=2e-5, err_msg=name)
    outputs = {}
    for name, model in (("fused", fused), ("reference", reference)):
        model.network.set_state_dict(fused.network.state_dict())
        model.begin_epoch(0, False)
        outputs[name] = [model.eval_step(b, 10, "standard") for b in steps_of(sessions, 600, with_final=True)]
    for f, r in zip(outputs["fused"], outputs["reference"]):
        np.testing.assert_array_equal(f.ranks, r.ranks)
        np.testing.assert_array_equal(f.topk_ids, r.topk_ids)


THREAD_RUN = """
import hashlib, sys
import numpy as np
from tests.helpers import make_model, random_sessions, steps_of
sessions = random_sessions(n_sessions=300, n_items=700, seed=int(sys.argv[1]))
settings = {"layers": [24, 16], "n_sample": 400, "loss": sys.argv[2], "logq": 0.5, "dropout_hidden": 0.2,
            "optimizer": {"momentum": 0.2}}
model = make_model(sessions, kernel="fused", **settings)
digest = hashlib.sha256()
for epoch in (1, 2):
    model.begin_epoch(epoch, True)
    for batch in steps_of(sessions, 40, chunk=16):
        digest.update(np.asarray(model.train_step(batch, 40), np.float64).tobytes())
for name in model.network.param_names:
    digest.update(getattr(model.network, name).numpy().tobytes())
for value in model.optimizer.state.values():
    digest.update(value.numpy().tobytes())
sampler = model.sampler  # a range of negatives across the kernel's draw tasks (65,536 draws each)
digest.update(np.asarray(model.train_impl().draw_negatives(sampler.accept, sampler.alias, 99, 3, 70000, 150000)).tobytes())
model.begin_epoch(0, False)
for batch in steps_of(sessions, 37, with_final=True):
    out = model.eval_step(batch, 10, "standard")
    digest.update(out.ranks.tobytes() + out.topk_ids.tobytes() + out.topk_scores.tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max"])
def test_results_are_bitwise_identical_for_any_thread_count(loss):
    """The kernel cuts its work into tiles whose shapes do not depend on the thread count and sums
    partial results in tile order: 1 to 4 threads give the same bits (training and evaluation)."""
    import os
    import subprocess
    import sys

    seed = 21
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {}
    for threads in (1, 2, 3, 4):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        done = subprocess.run([sys.executable, "-c", THREAD_RUN, str(seed), loss], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        digests[threads] = done.stdout.strip().splitlines()[-1]
    assert len(set(digests.values())) == 1, f"seed {seed}: {digests}"


def test_kernel_draws_the_negatives_of_the_numpy_twin():
    """The sampler's stream is the same with or without the kernel: ranges of blocks, across the
    kernel's draw tasks, any key (the full 64 bits)."""
    seed = 5
    rng = np.random.default_rng(seed)
    support = rng.integers(0, 300, 1000)
    sampler = model_module.NegativeSampler(support, n_sample=50, alpha=0.75, store=10_000, seed=seed)
    fused = model_module.FusedStep.__new__(model_module.FusedStep)  # only its draw operator
    fused.draw_op, fused.alias_tensors = fused_ops.load().gru4rec_draw_negatives, None
    for key, block, start, count in ((sampler.key, 0, 0, 5), (2 ** 64 - 1, 7, 65_530, 140_000), (0, 2 ** 40, 3, 0)):
        expected = model_module.draw_negatives(sampler.accept, sampler.alias, key, block, start, count)
        got = fused.draw_negatives(sampler.accept, sampler.alias, key, block, start, count)
        np.testing.assert_array_equal(got, expected, err_msg=f"seed {seed}, key {key}, block {block}, start {start}")
        assert support[got].min(initial=1) > 0  # never an item without clicks


@pytest.mark.parametrize("embedding,loss", [("shared", "cross-entropy"), ("separate", "bpr-max"), ("none", "top1-max")])
def test_gradients_then_update_equals_the_whole_step(embedding, loss):
    """Distributed training runs the fused step in two halves (gradients, then the update of the
    combined gradients). With a pass-through combiner the halves give exactly what one call gives,
    and the reference step with the same combiner agrees."""
    sessions = random_sessions(n_sessions=60, n_items=50, seed=13)
    settings = {"layers": [10, 8] if embedding != "shared" else [8], "embedding": embedding, "embedding_size": 6,
                "loss": loss, "n_sample": 12, "logq": 0.5, "optimizer": {"momentum": 0.3}}
    seen = []

    def pass_through(dense, sparse):
        seen.append((sorted(dense), sorted(sparse)))
        return dense, sparse

    whole = make_model(sessions, kernel="fused", **settings)
    halves = make_model(sessions, kernel="fused", **settings)
    reference = make_model(sessions, kernel="reference", **settings)
    halves.grad_reducer = reference.grad_reducer = pass_through
    losses = {}
    for name, model in (("whole", whole), ("halves", halves), ("reference", reference)):
        model.begin_epoch(1, True)
        losses[name] = [l for batch in steps_of(sessions, 6) for l in model.train_step(batch, 6)]
    assert len(seen) > 20 and seen[0] == seen[-1]
    np.testing.assert_array_equal(losses["halves"], losses["whole"])
    np.testing.assert_allclose(losses["halves"], losses["reference"], rtol=2e-4, atol=1e-5)
    for name in whole.network.param_names:
        np.testing.assert_array_equal(getattr(halves.network, name).numpy(), getattr(whole.network, name).numpy(),
                                      err_msg=name)
        np.testing.assert_allclose(getattr(halves.network, name).numpy(), getattr(reference.network, name).numpy(),
                                   rtol=1e-3, atol=2e-5, err_msg=name)
