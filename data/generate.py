"""Generate the default data set: synthetic click sessions with the structure of real ones.

    python data/generate.py [--out-dir data] [--seed 2015] [--items 1000] [--train-sessions 8000]
                            [--test-sessions 1000]

The shipped data/train/sessions.txt and data/test/sessions.txt are this script's output with
its defaults (a test checks that they still are). Nothing in them comes from real users.

How a session is made (every draw from one numpy Generator seeded with --seed):
  * Popularity is heavy-tailed: item weights follow a Zipf-Mandelbrot law, w ~ (rank + 20)^-1.1,
    over a random order of the item ids, so the 20 most clicked items get about 16% of the clicks
    (13% in the RSC15 100k split).
  * Items belong to topics of 25 items. Each item has 6 successors, mostly from its own topic,
    with decreasing weights: the item-to-item transitions a sequence model can learn.
  * A session picks its first item by popularity; each next click repeats the current item
    (p=0.12), follows one of its successors (p=0.60), picks an item of the session's topic by
    popularity (p=0.16) or any item by popularity (p=0.12).
  * Lengths follow RSC15's: 2 + a mixture of two geometric laws (70% with p=0.5, 30% with
    p=0.18), capped at 60 clicks: 43% of sessions have 2 clicks, 20% 3, 12% 4, mean about 4.
Sessions are in "time" order: the last --test-sessions are the test split, as in the RSC15
protocol, with their clicks on items never clicked in training dropped and sessions left with
fewer than 2 clicks removed (both counted). Ids are model ids (0 .. items-1): no vocab needed.

Writes OUT/train/sessions.txt and OUT/test/sessions.txt (one session per line, item ids
separated by spaces), each under a temporary name renamed into place; safe to run again.
"""

import os
import sys
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data/ is not a package
from cli_common import DataError, UsageParser  # noqa: E402

DEFAULT_SEED = 2015
TOPIC_SIZE = 25
SUCCESSORS = 6
P_REPEAT, P_SUCCESSOR, P_TOPIC = 0.12, 0.60, 0.16  # the rest: any item by popularity
MAX_LENGTH = 60


@dataclass(frozen=True)
class World:
    """The fixed structure every session is drawn from."""

    popularity: np.ndarray  # float64 [n_items], sums to 1
    topic_of: np.ndarray  # int64 [n_items]
    topic_items: List[np.ndarray]  # items of each topic
    topic_popularity: List[np.ndarray]  # popularity within each topic, sums to 1
    successors: np.ndarray  # int64 [n_items, SUCCESSORS]
    successor_weights: np.ndarray  # float64 [n_items, SUCCESSORS], rows sum to 1


def make_world(rng: np.random.Generator, n_items: int) -> World:
    order = rng.permutation(n_items)  # order[r] = the item of popularity rank r
    weights = np.empty(n_items)
    weights[order] = (np.arange(n_items) + 20.0) ** -1.1
    popularity = weights / weights.sum()
    topic_of = rng.permutation(n_items) // TOPIC_SIZE
    n_topics = int(topic_of.max()) + 1
    topic_items = [np.flatnonzero(topic_of == t) for t in range(n_topics)]
    topic_popularity = [popularity[items] / popularity[items].sum() for items in topic_items]
    successors = np.empty((n_items, SUCCESSORS), dtype=np.int64)
    for item in range(n_items):
        own = topic_items[topic_of[item]]
        own = own[own != item]
        # mostly the topic's items (favouring the popular ones a little), sometimes any item
        in_topic = rng.choice(own, size=SUCCESSORS, replace=False, p=_normalised(popularity[own] ** 0.5))
        anywhere = rng.choice(n_items, size=SUCCESSORS, p=popularity)
        successors[item] = np.where(rng.random(SUCCESSORS) < 0.8, in_topic, anywhere)
    successor_weights = np.tile(0.6 ** np.arange(SUCCESSORS), (n_items, 1))
    successor_weights /= successor_weights.sum(axis=1, keepdims=True)
    return World(popularity, topic_of, topic_items, topic_popularity, successors, successor_weights)


def _normalised(weights):
    return weights / weights.sum()


def session_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    short = rng.random(n) < 0.7
    extra = np.where(short, rng.geometric(0.5, n), rng.geometric(0.18, n)) - 1
    return np.minimum(2 + extra, MAX_LENGTH)


def make_session(rng: np.random.Generator, world: World, length: int) -> List[int]:
    n_items = len(world.popularity)
    item = int(rng.choice(n_items, p=world.popularity))
    topic = int(world.topic_of[item])
    clicks = [item]
    for _ in range(length - 1):
        u = rng.random()
        if u < P_REPEAT:
            pass
        elif u < P_REPEAT + P_SUCCESSOR:
            item = int(rng.choice(world.successors[item], p=world.successor_weights[item]))
        elif u < P_REPEAT + P_SUCCESSOR + P_TOPIC:
            item = int(rng.choice(world.topic_items[topic], p=world.topic_popularity[topic]))
        else:
            item = int(rng.choice(n_items, p=world.popularity))
        clicks.append(item)
    return clicks


def generate(seed: int = DEFAULT_SEED, n_items: int = 1000, n_train: int = 8000,
             n_test: int = 1000) -> Tuple[List[List[int]], List[List[int]], dict]:
    """(train sessions, test sessions, counts): the whole data set for one seed."""
    if n_items < 2 * TOPIC_SIZE:
        raise DataError(f"--items must be at least {2 * TOPIC_SIZE} (topics hold {TOPIC_SIZE} items)")
    if n_train < 1 or n_test < 1:
        raise DataError("--train-sessions and --test-sessions must be at least 1")
    rng = np.random.default_rng(seed)
    world = make_world(rng, n_items)
    lengths = session_lengths(rng, n_train + n_test)
    sessions = [make_session(rng, world, int(n)) for n in lengths]
    train, test_raw = sessions[:n_train], sessions[n_train:]
    known = np.zeros(n_items, dtype=bool)
    for session in train:
        known[session] = True
    test, dropped_clicks, dropped_sessions = [], 0, 0
    for session in test_raw:
        kept = [i for i in session if known[i]]
        dropped_clicks += len(session) - len(kept)
        if len(kept) >= 2:
            test.append(kept)
        else:
            dropped_sessions += 1
    counts = {"train_sessions": len(train), "train_clicks": sum(map(len, train)), "test_sessions": len(test),
              "test_targets": sum(len(s) - 1 for s in test), "items_in_train": int(known.sum()),
              "dropped_test_clicks": dropped_clicks, "dropped_test_sessions": dropped_sessions}
    return train, test, counts


def write_sessions(path: str, sessions: List[List[int]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            for session in sessions:
                f.write(" ".join(map(str, session)) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write: {exc.strerror or exc}", path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    parser = UsageParser(prog="python data/generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)),
                        help="writes <this>/train/sessions.txt and <this>/test/sessions.txt (default: data/)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    parser.add_argument("--items", type=int, default=1000, help="items (default 1000)")
    parser.add_argument("--train-sessions", type=int, default=8000, help="training sessions (default 8000)")
    parser.add_argument("--test-sessions", type=int, default=1000,
                        help="sessions generated for the test split, before dropping (default 1000)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train, test, counts = generate(args.seed, args.items, args.train_sessions, args.test_sessions)
        write_sessions(os.path.join(args.out_dir, "train", "sessions.txt"), train)
        write_sessions(os.path.join(args.out_dir, "test", "sessions.txt"), test)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"generated (seed {args.seed}): {counts['train_sessions']} training sessions, {counts['train_clicks']} "
          f"clicks on {counts['items_in_train']} items; {counts['test_sessions']} test sessions, "
          f"{counts['test_targets']} targets ({counts['dropped_test_clicks']} test clicks on items unseen in "
          f"training and {counts['dropped_test_sessions']} sessions left too short dropped) in {args.out_dir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
