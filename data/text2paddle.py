"""Build the item vocabulary and map sessions to model ids; write the run config.

Input: session files as written by convert_format.py (one session per line,
original item ids separated by spaces, sessions in time order).

* ``vocab.txt``: one original item id per line; the 0-based line number is the
  model id.  Built from the TRAINING file only, in order of first appearance,
  so the test set cannot leak items into the model and the ids are stable for
  a given training file.  The config reads the vocabulary size from this file.
* train: every id mapped (all are in the vocabulary by construction).
* test: clicks on items unknown to train are dropped, then sessions left
  shorter than 2 (nothing to predict); both counts are reported.

``write_config`` turns the repository's ``config.yaml`` into one that trains
on what data_prepare.sh produced (see its docstring for exactly what changes).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data/ is not a package
from cli_common import DataError, UsageParser, run_main  # noqa: E402
from paddlerec import yamlfile  # noqa: E402
from paddlerec.files import atomic_files, temporary_name, write_text  # noqa: E402


log = logging.getLogger(__name__)

MIN_TEST_SESSION_LENGTH = 2
WORKSPACE_OUTPUT = "{workspace}/output"


def read_sessions(path: str):
    """Yield (line_no, list of item id strings) for each session line.

    Ids must be non-negative integers and a session must not be empty; anything
    else is a DataError naming the line.
    """
    try:
        stream = open(path, encoding="ascii", newline=None)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise DataError(f"cannot read the session file ({exc.strerror})", path,
                        hint="run data/convert_format.py first") from None
    with stream:
        line_no = 0
        try:
            for line_no, line in enumerate(stream, start=1):
                tokens = line.split()
                if not tokens:
                    raise DataError("empty session line", path, line_no,
                                    hint="each line must hold the item ids of one session")
                if not "".join(tokens).isdigit():
                    bad = next(t for t in tokens if not t.isdigit())
                    raise DataError(f"item id {bad!r} is not a non-negative integer",
                                    path, line_no, hint="fix or remove the line")
                yield line_no, tokens
        except UnicodeDecodeError:
            raise DataError("non-ASCII bytes in a session file", path, line_no + 1,
                            hint="item ids must be plain integers") from None


def map_train(train_path: str, out_stream) -> tuple[dict, int, int]:
    """Assign model ids in order of first appearance and write the mapped train file.

    Returns (vocab: original id → model id, sessions, events).
    """
    vocab: dict[str, int] = {}
    sessions = events = 0
    for _, tokens in read_sessions(train_path):
        ids = [vocab.setdefault(token, len(vocab)) for token in tokens]
        out_stream.write(" ".join(map(str, ids)) + "\n")
        sessions += 1
        events += len(ids)
    return vocab, sessions, events


def map_test(test_path: str, vocab: dict, out_stream) -> dict:
    """Write the test sessions in model ids, dropping unknown items then short sessions."""
    counts = {"sessions_in": 0, "events_in": 0, "unknown_items_dropped": 0,
              "short_sessions_dropped": 0, "sessions": 0, "events": 0}
    for _, tokens in read_sessions(test_path):
        counts["sessions_in"] += 1
        counts["events_in"] += len(tokens)
        ids = [vocab[token] for token in tokens if token in vocab]
        counts["unknown_items_dropped"] += len(tokens) - len(ids)
        if len(ids) < MIN_TEST_SESSION_LENGTH:
            counts["short_sessions_dropped"] += 1
            continue
        out_stream.write(" ".join(map(str, ids)) + "\n")
        counts["sessions"] += 1
        counts["events"] += len(ids)
    return counts


def build(train_path: str, test_path: str, vocab_path: str,
          train_out: str, test_out: str) -> dict:
    """Vocabulary from train, both files mapped; returns the counts it logged."""
    with atomic_files(vocab_path, train_out, test_out, encoding="ascii",
                      newline="\n") as (vocab_stream, train_stream, test_stream):
        vocab, sessions, events = map_train(train_path, train_stream)
        if not vocab:
            raise DataError("the training file has no sessions", train_path,
                            hint="check the preprocessing output")
        vocab_stream.write("".join(token + "\n" for token in vocab))
        test_counts = map_test(test_path, vocab, test_stream)
    log.info("vocab: %d items from %s → %s", len(vocab), train_path, vocab_path)
    log.info("train: %d sessions, %d ids → %s", sessions, events, train_out)
    log.info("test: %d of %d sessions kept, %d ids → %s; dropped %d click(s) on items "
             "unknown to train and then %d session(s) shorter than %d",
             test_counts["sessions"], test_counts["sessions_in"], test_counts["events"],
             test_out, test_counts["unknown_items_dropped"],
             test_counts["short_sessions_dropped"], MIN_TEST_SESSION_LENGTH)
    return {"vocab_size": len(vocab), "train_sessions": sessions, "train_events": events,
            **{f"test_{key}": value for key, value in test_counts.items()}}


# --------------------------------------------------------------------------
# run config


def _replace_output_prefix(value, out_dir: str):
    """Strings starting with ``{workspace}/output`` → ``<out_dir>/output...``, recursively."""
    if isinstance(value, str) and value.startswith(WORKSPACE_OUTPUT):
        return os.path.join(out_dir, "output") + value[len(WORKSPACE_OUTPUT):]
    if isinstance(value, dict):
        return {key: _replace_output_prefix(item, out_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_output_prefix(item, out_dir) for item in value]
    return value


def load_yaml_config(path: str) -> dict:
    """The repository config as a dict; DataError (with line) when unreadable."""
    try:
        config = yamlfile.load_file(path)
    except OSError as exc:
        raise DataError(f"cannot read the config ({exc.strerror or exc})", path,
                        hint="pass the repository's config.yaml") from None
    except yamlfile.YamlProblem as exc:
        raise DataError(str(exc), path, exc.line) from None
    if not isinstance(config, dict):
        raise DataError("config is not a YAML mapping", path, hint="pass the repository's config.yaml")
    for key in ("dataset", "runner"):
        if not isinstance(config.get(key), list):
            raise DataError(f"config has no '{key}' list", path,
                            hint="pass the repository's config.yaml")
    return config


def make_config(config: dict, out_dir: str, workspace: str, path: str = "config") -> dict:
    """The repository config pointed at the data in `out_dir`.

    Changes only: ``workspace`` → `workspace`; the datasets named
    ``dataset_train`` / ``dataset_infer`` → ``data_path`` OUT/all_train /
    OUT/all_test and ``vocab_path`` OUT/vocab.txt; in every runner, strings
    starting with ``{workspace}/output`` → OUT/output...  (so checkpoints and
    predictions of a run land beside its data); and, when OUT/tune holds the
    tuning split, the datasets, phases and tune runner of ``_add_tuning``.
    """
    out_dir = os.path.abspath(out_dir)
    config = copy.deepcopy(config)
    config["workspace"] = os.path.abspath(workspace)
    datasets = {entry.get("name"): entry for entry in config["dataset"]
                if isinstance(entry, dict)}
    vocab_path = os.path.join(out_dir, "vocab.txt")
    for name, folder in (("dataset_train", "all_train"), ("dataset_infer", "all_test")):
        if name not in datasets:
            raise DataError(f"config has no dataset named '{name}'", path,
                            hint="the dataset list must name its entries "
                                 "dataset_train and dataset_infer")
        datasets[name]["data_path"] = os.path.join(out_dir, folder)
        datasets[name]["vocab_path"] = vocab_path
    config["runner"] = [_replace_output_prefix(runner, out_dir) for runner in config["runner"]]
    if os.path.isfile(os.path.join(out_dir, "tune", "vocab.txt")):
        _add_tuning(config, out_dir, datasets, path)
    return config


TUNE_SPACES = {"bpr-max": "{workspace}/configs/tune_space_bprmax.yaml"}
TUNE_SPACE_DEFAULT = "{workspace}/configs/tune_space_xe.yaml"


def _add_tuning(config: dict, out_dir: str, datasets: dict, path: str) -> None:
    """The tuning split OUT/tune (train_tr -> train_valid, its own vocab) as datasets
    dataset_train_tr / dataset_train_valid (copies of dataset_train / dataset_infer),
    phases phase_train_tr / phase_train_valid (copies of phase_train / phase_infer) and
    a runner tune_runner searching the space that suits the config's loss."""
    phases = {entry.get("name"): entry for entry in config.get("phase") or [] if isinstance(entry, dict)}
    if "phase_train" not in phases or "phase_infer" not in phases:
        raise DataError("config has no phases named 'phase_train' and 'phase_infer'", path,
                        hint="the tuning phases are copies of them")
    tune = os.path.join(out_dir, "tune")
    for source, name, folder in (("dataset_train", "dataset_train_tr", "all_train"),
                                 ("dataset_infer", "dataset_train_valid", "all_test")):
        entry = dict(datasets[source], name=name, data_path=os.path.join(tune, folder),
                     vocab_path=os.path.join(tune, "vocab.txt"))
        config["dataset"] = [e for e in config["dataset"] if e.get("name") != name] + [entry]
    for source, name, dataset in (("phase_train", "phase_train_tr", "dataset_train_tr"),
                                  ("phase_infer", "phase_train_valid", "dataset_train_valid")):
        config["phase"] = [e for e in config["phase"] if e.get("name") != name] + [
            dict(phases[source], name=name, dataset_name=dataset)]
    loss = (config.get("hyper_parameters") or {}).get("loss")
    runner = {"name": "tune_runner", "class": "tune", "device": "cpu", "phases": ["phase_train_tr"],
              "eval_phase": "phase_train_valid", "search_space": TUNE_SPACES.get(loss, TUNE_SPACE_DEFAULT),
              "n_trials": 20, "epochs": 3, "metric": "recall", "cutoff": 20,
              "study_path": os.path.join(out_dir, "output", "tune", "study.db"),
              "best_config_path": os.path.join(out_dir, "output", "tune", "best.yaml")}
    config["runner"] = [e for e in config["runner"] if e.get("name") != "tune_runner"] + [runner]


def config_text(repo_config: str, out_dir: str, workspace: str | None = None) -> str:
    """The text of ``<out_dir>/config.yaml`` derived from `repo_config`, validated as
    ``paddlerec.run`` will validate it (except that the data files need not exist yet);
    DataError naming the key otherwise.

    `workspace` defaults to the directory holding `repo_config` (the repository).
    """
    config = load_yaml_config(repo_config)
    workspace = workspace or os.path.dirname(os.path.abspath(repo_config))
    config = make_config(config, out_dir, workspace, repo_config)
    text = (f"# Written by data/text2paddle.py --write-config from {os.path.abspath(repo_config)}\n"
            "# for the data in this folder; regenerate it rather than editing it.\n"
            + yaml.safe_dump(config, sort_keys=False, default_flow_style=False,
                             allow_unicode=True))
    check_config_text(text, out_dir, repo_config)
    return text


def check_config_text(text: str, out_dir: str, repo_config: str) -> None:
    """DataError unless `text`, saved as ``<out_dir>/config.yaml``, passes paddlerec's validation."""
    from paddlerec.config import load_config
    from paddlerec.errors import ConfigError

    os.makedirs(out_dir, exist_ok=True)
    # checked where it will live (relative paths in it resolve against out_dir), under a hidden
    # name that nothing reads as a config
    probe = temporary_name(os.path.join(out_dir, "config.yaml"))
    try:
        with open(probe, "w", encoding="utf-8") as stream:
            stream.write(text)
        load_config(probe, check_files=False)
    except ConfigError as exc:
        raise DataError(f"the adapted config would not run ({exc})", repo_config,
                        hint="fix it, or pass another with --config") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def write_config(repo_config: str, out_dir: str, workspace: str | None = None) -> str:
    """Write ``<out_dir>/config.yaml`` derived from `repo_config`; returns its path."""
    text = config_text(repo_config, out_dir, workspace)
    target = os.path.join(out_dir, "config.yaml")
    write_text(target, text)
    log.info("config: %s", target)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        description="Build vocab.txt from the training sessions, map train/test to "
                    "model ids, and/or write a config.yaml for the produced data.")
    parser.add_argument("--out-dir", required=True,
                        help="output folder: vocab.txt, all_train/train.txt, "
                             "all_test/test.txt, config.yaml")
    parser.add_argument("--train", help="training sessions (original ids, one per line)")
    parser.add_argument("--test", help="test sessions (original ids, one per line)")
    parser.add_argument("--write-config", metavar="REPO_CONFIG",
                        help="also write OUT/config.yaml from this config.yaml")
    parser.add_argument("--check-config", metavar="REPO_CONFIG",
                        help="only check that the config written from REPO_CONFIG would run "
                             "(data_prepare.sh does it before any data work)")
    parser.add_argument("--workspace",
                        help="workspace for the written config (default: the folder of "
                             "REPO_CONFIG)")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.train is None) != (args.test is None):
        print("error: --train and --test go together; pass both", file=sys.stderr)
        return 2
    if args.check_config is not None:
        try:
            config_text(args.check_config, args.out_dir, args.workspace)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {exc.strerror or exc}, {exc.filename or args.out_dir}; "
                  "check the output folder", file=sys.stderr)
            return 1
        return 0
    if args.train is None and args.write_config is None:
        print("error: nothing to do; pass --train and --test, and/or --write-config",
              file=sys.stderr)
        return 2
    out = args.out_dir
    try:
        if args.train is not None:
            build(args.train, args.test, os.path.join(out, "vocab.txt"),
                  os.path.join(out, "all_train", "train.txt"),
                  os.path.join(out, "all_test", "test.txt"))
        if args.write_config is not None:
            write_config(args.write_config, out, args.workspace)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}, {exc.filename or out}; "
              "check the output folder and free disk space", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
