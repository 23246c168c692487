"""Metrics (Recall, MRR, NDCG, Coverage, Popularity @K) and the baselines (POP, S-POP, item-kNN)
against hand computations on tiny data, through the same evaluation loop the model uses."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from paddlerec.baselines import ItemKNN, Pop, SessionPop, make_baseline
from paddlerec.contract import DataInfo
from paddlerec.loops import evaluate
from paddlerec.metrics import ListMetrics, RankMetrics, comparison_table, tie_ranks, top_k
from paddlerec.run import main
from tests.helpers import REPO


def load_reader_module():
    spec = importlib.util.spec_from_file_location("rsc15_reader_for_metrics", os.path.join(REPO, "rsc15_reader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# training sessions: clicks per item (supp) 4, 3, 1, 1
TRAIN = ["0 1 0", "1 2", "0 3", "0 1"]
# test targets: 3 after [2], 1 after [2, 3], 1 after [1]
TEST = ["2 3 1", "1 1"]


@pytest.fixture
def tiny(tmp_path):
    for split, lines in (("train", TRAIN), ("test", TEST)):
        (tmp_path / split).mkdir()
        (tmp_path / split / "sessions.txt").write_text("\n".join(lines) + "\n")
    module = load_reader_module()
    train, test = module.Reader(str(tmp_path / "train")), module.Reader(str(tmp_path / "test"))
    return tmp_path, train, test


def run_eval(baseline, test, tie_mode="standard", topk=2, cutoffs=(1, 2)):
    lists = ListMetrics(cutoffs, baseline.support)
    return evaluate(baseline, test, 2, cutoffs, tie_mode, topk, lists=lists)


def test_rank_metrics_by_hand():
    metrics = RankMetrics([1, 3])
    metrics.add([1.0, 2.0, 3.0, 25.0])
    got = metrics.result()
    assert got["targets"] == 4
    assert got["recall@1"] == 0.25 and got["recall@3"] == 0.75
    assert got["mrr@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 4)
    assert got["ndcg@1"] == pytest.approx(0.25)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 1 / 2) / 4)


def test_tie_modes_and_top_k_tie_order():
    # 2 items score higher, the target ties with 2 others (3 equal, itself included)
    assert tie_ranks([2], [3], "standard").tolist() == [3.0]
    assert tie_ranks([2], [3], "conservative").tolist() == [5.0]
    assert tie_ranks([2], [3], "median").tolist() == [4.0]
    ids, scores = top_k(np.array([[0.5, 0.9, 0.5, 0.9, 0.1]]), 3)
    assert ids.tolist() == [[1, 3, 0]] and scores.tolist() == [[0.9, 0.9, 0.5]]  # ties: the lower id first


def test_list_metrics_by_hand():
    clicks = np.array([10, 5, 0, 2, 1])  # item 2 never clicked: not among the 4 coverable items
    lists = ListMetrics([1, 2, 5], clicks)
    lists.add(np.array([[0, 1], [0, 3], [1, 1]]))  # the last list repeats an item: counted once
    got = lists.result()
    assert got["lists"] == 3
    assert got["coverage@1"] == 2 / 4 and got["coverage@2"] == 3 / 4
    assert got["popularity@1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert got["popularity@2"] == pytest.approx(((1 + 0.5) / 2 + (1 + 0.2) / 2 + 0.5) / 3)
    assert "coverage@5" not in got  # the lists hold 2 items
    assert "popularity@1" not in ListMetrics([1], clicks > 0, with_popularity=False).result()


def test_pop_by_hand(tiny):
    _, train, test = tiny
    pop = Pop(train.info())
    # scores supp/(supp+1): 0.8, 0.75, 0.5, 0.5; target 3 has 2 items above it and ties with item 2
    got = run_eval(pop, test)
    assert got["targets"] == 3
    assert got["recall@2"] == pytest.approx(2 / 3) and got["mrr@2"] == pytest.approx((0 + 1 / 2 + 1 / 2) / 3)
    assert got["recall@1"] == 0
    assert got["coverage@2"] == 2 / 4 and got["popularity@2"] == pytest.approx((1 + 3 / 4) / 2)
    assert got["lists"] == 3  # one list per target
    conservative = run_eval(pop, test, "conservative")  # target 3 -> rank 4
    assert conservative["mrr@2"] == pytest.approx(1 / 3) and conservative["recall@2"] == pytest.approx(2 / 3)
    assert run_eval(pop, test, "median", cutoffs=(4,))["mrr@4"] == pytest.approx((1 / 3.5 + 1 / 2 + 1 / 2) / 3)


def test_session_pop_by_hand_and_sessions_do_not_leak(tiny):
    _, train, test = tiny
    # at [2]: item 2 scores 1 + 0.5, above 0.8, 0.75 and target 3's 0.5 -> rank 4
    # at [2, 3]: 2 and 3 score 1.5, item 0 0.8, target 1 0.75 -> rank 4
    # at [1] (a new session: t0's clicks must not count): item 1 scores 1.75 -> rank 1
    got = run_eval(SessionPop(train.info()), test, cutoffs=(1, 4))
    assert got["recall@1"] == pytest.approx(1 / 3) and got["recall@4"] == 1.0
    assert got["mrr@4"] == pytest.approx((1 / 4 + 1 / 4 + 1) / 3)
    # top_n=1: only item 0 keeps a popularity score; at [1], item 1 scores 1 + 0 and stays first
    got = run_eval(SessionPop(train.info(), top_n=1), test, cutoffs=(1,))
    assert got["recall@1"] == pytest.approx(1 / 3)


def test_item_knn_by_hand(tiny):
    _, train, test = tiny
    knn = ItemKNN(train.info(), n_sims=100, lmbd=0.0, alpha=0.5)
    knn.fit(train.batches(2, training=True))
    # co-occurrence sum_s n_s(i) n_s(j): (0,1) 2 + 1 = 3, (1,2) 1, (0,3) 1; supports 4, 3, 1, 1
    sims = {(i, int(j)): s for i in range(4) for j, s in zip(knn.neighbours[i], knn.similarity[i]) if s > 0}
    assert sims == pytest.approx({(0, 1): 3 / math.sqrt(12), (1, 0): 3 / math.sqrt(12), (0, 3): 1 / 2,
                                  (3, 0): 1 / 2, (1, 2): 1 / math.sqrt(3), (2, 1): 1 / math.sqrt(3)})
    assert knn.neighbours[0].tolist()[:2] == [1, 3]  # most similar first
    # at 2: only item 1 scores -> target 3 (0) rank 2; at 3: item 0 -> target 1 rank 2;
    # at 1: items 0 and 2 score, itself 0 -> target 1 rank 3
    got = run_eval(knn, test, cutoffs=(2, 3))
    assert got["recall@2"] == pytest.approx(2 / 3) and got["mrr@3"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    # conservative: every target ties with the zero-scored items (itself and 2 others) -> rank 4 each
    conservative = run_eval(knn, test, "conservative", cutoffs=(3, 4))
    assert conservative["recall@3"] == 0 and conservative["mrr@4"] == pytest.approx(1 / 4)
    # session-rec's default regularisation: sim(0, 1) = 3 / ((4 + 20)^0.5 (3 + 20)^0.5)
    regular = make_baseline("iknn", train.info())
    regular.fit(train.batches(3, training=True))
    assert regular.similarity[0][0] == pytest.approx(3 / math.sqrt(24 * 23))
    # n_sims caps the neighbours kept
    capped = ItemKNN(train.info(), n_sims=1)
    capped.fit(train.batches(2, training=True))
    assert capped.neighbours.shape == (4, 1) and capped.neighbours[0, 0] == 1


def test_target_lists_leave_ranks_and_recommendations_unchanged(tiny):
    _, train, test = tiny
    pop = Pop(train.info())
    plain, with_lists = [], []
    base = evaluate(pop, test, 2, (1, 2), "standard", 2, on_output=plain.append)
    listed = evaluate(pop, test, 2, (1, 2), "standard", 2, on_output=with_lists.append,
                      lists=ListMetrics((1, 2), pop.support))
    assert {k: v for k, v in listed.items() if k in base} == base
    ended = lambda outs: sorted(int(q) for out in outs for q in out.query_ids)
    assert ended(plain) == ended(with_lists) == [0, 1]  # only the sessions' final lists reach on_output


def test_popularity_baseline_on_the_shipped_data_is_the_top_20_by_hand():
    module = load_reader_module()
    train = module.Reader(os.path.join(REPO, "data", "train"))
    test = module.Reader(os.path.join(REPO, "data", "test"))
    got = evaluate(Pop(train.info()), test, 512, (20,), "standard", 20)
    clicks = {}
    for line in open(os.path.join(REPO, "data", "train", "sessions.txt")):
        for item in line.split():
            clicks[int(item)] = clicks.get(int(item), 0) + 1
    top20 = sorted(clicks, key=lambda i: (-clicks[i], i))[:20]
    targets = [int(t) for line in open(os.path.join(REPO, "data", "test", "sessions.txt")) for t in line.split()[1:]]
    assert got["targets"] == len(targets)
    assert got["recall@20"] == pytest.approx(sum(t in top20 for t in targets) / len(targets))


def test_comparison_table_layout():
    lines = comparison_table([("POP", {"recall@20": 0.5}), ("a longer name", {"recall@20": 0.25})], ["recall@20"])
    assert lines[0].split() == ["Recall@20"] and lines[1].split() == ["POP", "0.5000"]
    assert lines[2].endswith("0.2500") and len({len(line) for line in lines}) == 1


def test_baseline_runner_end_to_end(tiny, capsys):
    folder, _, _ = tiny
    config = folder / "config.yaml"
    config.write_text(f"""
workspace: "{folder}"
dataset:
- {{name: train, batch_size: 2, data_path: "{{workspace}}/train", data_converter: "{REPO}/rsc15_reader.py"}}
- {{name: test, batch_size: 2, data_path: "{{workspace}}/test", data_converter: "{REPO}/rsc15_reader.py"}}
hyper_parameters: {{layers: [8]}}
phase:
- {{name: p_train, model: "{REPO}/model.py", dataset_name: train}}
- {{name: p_test, model: "{REPO}/model.py", dataset_name: test}}
mode: [baselines]
runner:
- name: baselines
  class: baseline
  train_phase: p_train
  phases: [p_test]
  topk: 3
  cutoffs: [2]
  knn_lambda: 0.0
  metrics_path: "{{workspace}}/out"
""")
    assert main(["-m", str(config), "--no-progress"]) == 0
    rows = {row["model"]: row for row in json.loads((folder / "out" / "metrics.json").read_text())}
    assert sorted(rows) == ["POP", "S-POP", "item-kNN"]
    assert rows["POP"]["recall@2"] == pytest.approx(2 / 3)
    assert rows["S-POP"]["mrr@2"] == pytest.approx(1 / 3)  # ranks 4, 4, 1
    assert rows["item-kNN"]["mrr@2"] == pytest.approx(1 / 3)  # ranks 2, 2, 3
    header = (folder / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["runner", "phase", "model"] and "ndcg@2" in header and "popularity@2" in header


def test_baseline_runner_rejects_unknown_baselines(tiny, capsys):
    folder, _, _ = tiny
    config = folder / "config.yaml"
    config.write_text(f"""
dataset:
- {{name: train, batch_size: 2, data_path: "{folder}/train", data_converter: "{REPO}/rsc15_reader.py"}}
phase:
- {{name: p_train, model: "{REPO}/model.py", dataset_name: train}}
mode: [baselines]
runner:
- {{name: baselines, class: baseline, train_phase: p_train, phases: [p_train], baselines: [pop, sknn]}}
""")
    assert main(["-m", str(config)]) == 2
    err = capsys.readouterr().err
    assert "runner.baselines.baselines" in err and "pop, spop, iknn" in err
