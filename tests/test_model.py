"""model.py: the negative sampler, the losses, ranks with ties, and a small real-data run."""

import math
import os

import numpy as np
import paddle
import pytest

from csrc import kernel as fused_ops

import model as model_module
import rsc15_reader
from paddlerec.metrics import RankMetrics
from tests.helpers import RSC15_100K, make_model, random_sessions, steps_of


def test_sampler_follows_support_to_the_power_alpha():
    rng = np.random.default_rng(1)
    support = rng.integers(1, 500, 200)
    support[[3, 77]] = 0  # never clicked: never drawn
    sampler = model_module.NegativeSampler(support, n_sample=1000, alpha=0.5, store=200_000, seed=7)
    drawn = sampler.take(600).ravel()  # crosses three blocks of the stream
    assert drawn.shape == (600_000,)
    counts = np.bincount(drawn, minlength=200)
    assert counts[3] == counts[77] == 0
    expected = support ** 0.5 / (support ** 0.5).sum() * drawn.size
    keep = expected > 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    dof = keep.sum() - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2  # a wrong distribution gives chi2 in the thousands
    # alpha 0: uniform over the clicked items
    uniform = model_module.NegativeSampler(support, 1000, 0.0, 100_000, seed=7).take(100).ravel()
    share = np.bincount(uniform, minlength=200)[keep] / uniform.size
    assert np.abs(share - 1 / keep.sum()).max() < 0.3 / keep.sum()


def test_sampler_stream_does_not_depend_on_how_it_is_taken_or_resumed():
    seed = 11
    support = np.random.default_rng(seed).integers(0, 50, 80)
    whole = model_module.NegativeSampler(support, n_sample=30, alpha=0.5, store=300, seed=seed).take(47)
    pieces = model_module.NegativeSampler(support, n_sample=30, alpha=0.5, store=300, seed=seed)
    first = np.concatenate([pieces.take(3), pieces.take(9)])  # 12 rows: one block of 10 and a bit
    resumed = model_module.NegativeSampler(support, n_sample=30, alpha=0.5, store=300, seed=seed + 1)
    resumed.load_state(pieces.state())  # the state carries the key: the other seed does not matter
    rest = np.concatenate([resumed.take(8), resumed.take(27)])
    np.testing.assert_array_equal(np.concatenate([first, rest]), whole, err_msg=f"seed {seed}")
    assert len(np.unique(whole[:10], axis=0)) == 10  # rows differ (a stuck counter would repeat them)
    fresh = model_module.NegativeSampler(support, n_sample=30, alpha=0.5, store=300, seed=seed)
    fresh.load_state(model_module.NegativeSampler(support, 30, 0.5, 300, seed=seed).state())  # nothing drawn yet
    np.testing.assert_array_equal(fresh.take(47), whole, err_msg=f"seed {seed}")


SCORES = np.array([[2.0, -1.0, 0.5, 1.5],
                   [0.3, 1.0, -0.7, 2.0]], dtype=np.float32)  # 2 rows; targets are columns 0 and 1


def numpy_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_cross_entropy_with_logq_by_hand():
    shift = np.array([0.1, 0.4, -0.2, 0.3], np.float32)
    got = float(model_module.sampled_loss("cross-entropy", paddle.to_tensor(SCORES), paddle.to_tensor(shift), 0, 0))
    corrected = SCORES - shift
    expected = -(np.log(numpy_softmax(corrected)[0, 0]) + np.log(numpy_softmax(corrected)[1, 1]))
    assert got == pytest.approx(expected, rel=1e-5)


def negatives_softmax(a):
    """Softmax over each row without its own target (column i of row i)."""
    out = np.zeros_like(a)
    for i, row in enumerate(a):
        others = [j for j in range(a.shape[1]) if j != i]
        e = np.exp(row[others] - row[others].max())
        out[i, others] = e / e.sum()
    return out


def test_bpr_max_with_elu_and_regularisation_by_hand():
    elu, bpreg = 0.5, 1.95
    a = np.where(SCORES > 0, SCORES, elu * (np.exp(SCORES) - 1))
    weights = negatives_softmax(a)
    expected = 0.0
    for i in range(2):
        pair = sum(weights[i, j] / (1 + np.exp(-(a[i, i] - a[i, j]))) for j in range(4) if j != i)
        expected += -np.log(pair) + bpreg * sum(weights[i, j] * a[i, j] ** 2 for j in range(4))
    got = float(model_module.sampled_loss("bpr-max", paddle.to_tensor(SCORES), None, bpreg, elu))
    assert got == pytest.approx(expected, rel=1e-5)


def test_top1_max_by_hand():
    weights = negatives_softmax(SCORES)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = sum(weights[i, j] * (sig(SCORES[i, j] - SCORES[i, i]) + sig(SCORES[i, j] ** 2))
                   for i in range(2) for j in range(4) if j != i)
    got = float(model_module.sampled_loss("top1-max", paddle.to_tensor(SCORES), None, 0, 0))
    assert got == pytest.approx(expected, rel=1e-5)


def test_ranks_with_ties():
    # target (column 1) ties with column 2; one item scores higher, one is masked out (-inf)
    scores = paddle.to_tensor(np.array([[3.0, 2.0, 2.0, -np.inf, 1.0]], np.float32))
    targets = paddle.to_tensor(np.array([1]))
    assert model_module.rank_targets(scores, targets, "standard").tolist() == [2.0]
    assert model_module.rank_targets(scores, targets, "conservative").tolist() == [3.0]
    assert model_module.rank_targets(scores, targets, "median").tolist() == [2.5]
    metrics = RankMetrics([1, 2, 3])
    metrics.add([2.0, 3.0, 1.0, 25.0])
    result = metrics.result()
    assert result["targets"] == 4
    assert result["recall@1"] == 0.25 and result["recall@2"] == 0.5 and result["recall@3"] == 0.75
    assert result["mrr@3"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 4)
    assert result["mrr@1"] == pytest.approx(0.25)


def load_tsv_sessions(path, item_index=None):
    """A plain reading of a GRU4Rec TSV: sessions in order of their first click, items mapped to ids."""
    rows = np.loadtxt(path, delimiter="\t", skiprows=1)
    session, item, time = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64), rows[:, 2]
    order = np.lexsort((time, session))
    session, item, time = session[order], item[order], time[order]
    if item_index is None:
        item_index = {v: i for i, v in enumerate(dict.fromkeys(item.tolist()))}
    keep = np.array([v in item_index for v in item.tolist()])
    session, item, time = session[keep], item[keep], time[keep]
    ids = np.array([item_index[v] for v in item.tolist()], np.int64)
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    lengths = np.diff(np.r_[starts, len(session)])
    by_time = np.argsort(time[starts], kind="stable")
    lists = [ids[starts[s]:starts[s] + lengths[s]] for s in by_time]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in lists])]).astype(np.int64)
    return rsc15_reader.Sessions(np.concatenate(lists), offsets), item_index


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(RSC15_100K), reason=f"real RSC15 sample not found at {RSC15_100K}")
def test_one_epoch_on_real_data_beats_popularity_by_far():
    train, index = load_tsv_sessions(os.path.join(RSC15_100K, "yoochoose-clicks-100k_train_full.txt"))
    test, _ = load_tsv_sessions(os.path.join(RSC15_100K, "yoochoose-clicks-100k_test.txt"), index)
    model = make_model(train, n_items=len(index), layers=[100], loss="cross-entropy", logq=1.0,
                       dropout_hidden=0.4, n_sample=2048, sample_alpha=0.5,
                       optimizer={"learning_rate": 0.2, "momentum": 0.2})
    model.begin_epoch(1, True)
    for batch in rsc15_reader.chunk_steps(rsc15_reader.session_parallel_steps(train, 32, False), 64):
        losses = model.train_step(batch, 32)
        assert np.all(np.isfinite(losses))
    model.begin_epoch(0, False)
    metrics = RankMetrics([20])
    for batch in rsc15_reader.chunk_steps(rsc15_reader.session_parallel_steps(test, 512, False), 64):
        metrics.add(model.eval_step(batch, 20, "standard").ranks)
    recall = metrics.result()["recall@20"]
    # the popularity baseline: the 20 most clicked training items for every target
    top20 = set(np.argsort(-np.bincount(train.items, minlength=len(index)), kind="stable")[:20].tolist())
    targets = [t for s in range(test.n_sessions) for t in test.items[test.offsets[s] + 1:test.offsets[s + 1]]]
    popularity = np.mean([t in top20 for t in targets])
    assert metrics.result()["targets"] == len(targets) == 10152
    assert popularity < 0.1
    assert recall > 0.5, (recall, popularity)  # one epoch of GRU4Rec already far above popularity


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_resumed_training_equals_uninterrupted_training(tmp_path, kernel):
    """Checkpoint after epoch 1, restore into a new model, train epoch 2: the same numbers as
    two epochs in one go (dropout and the negative-sample stream included)."""
    from paddlerec import checkpoint

    if kernel == "fused":
        try:
            fused_ops.load()
        except fused_ops.KernelUnavailable as exc:
            pytest.skip(f"fused kernel unavailable: {exc}")
    sessions = random_sessions(n_sessions=80, n_items=40, seed=2)
    settings = dict(kernel=kernel, layers=[12], dropout_hidden=0.3, dropout_embed=0.1, n_sample=9, sample_store=90,
                    logq=1.0, optimizer={"momentum": 0.3})

    def train(model, epoch):
        model.begin_epoch(epoch, True)
        return [loss for batch in steps_of(sessions, 6) for loss in model.train_step(batch, 6)]

    straight = make_model(sessions, **settings)
    losses = train(straight, 1) + train(straight, 2)

    first = make_model(sessions, **settings)
    first_losses = train(first, 1)
    checkpoint.save_checkpoint(str(tmp_path), 1, first, {"note": "test"})
    resumed = make_model(sessions, **settings)
    checkpoint.load_into(resumed, str(tmp_path / "1"))
    resumed_losses = first_losses + train(resumed, 2)

    np.testing.assert_allclose(resumed_losses, losses, rtol=1e-6)
    for name in straight.network.param_names:
        np.testing.assert_allclose(getattr(resumed.network, name).numpy(), getattr(straight.network, name).numpy(),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
