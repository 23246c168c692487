"""GRU4Rec TSV split → one session per line of original item ids.

Input: a TSV with header ``SessionId<TAB>ItemId<TAB>Time`` (columns found by
name, so their order does not matter), as written by preprocess.py or found
in other GRU4Rec-style preprocessed sets.

Output: one line per session, its ORIGINAL item ids separated by single
spaces, in time order (ties keep file order).  Sessions are ordered by the
time of their first event, ties by session id, so the file reads as the
sessions started — which is the order the session-parallel mini-batches of
GRU4Rec walk through.

Reading uses numpy's C parser (``np.loadtxt``); a bad row is then located by
a second, line-by-line scan, so the error can name file:line.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data/ is not a package
from cli_common import DataError, UsageParser, run_main  # noqa: E402
from paddlerec.files import atomic_file  # noqa: E402


log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("SessionId", "ItemId", "Time")
WRITE_SESSIONS = 200_000
INT64_MAX = 2**63 - 1  # ids are held as int64


def read_header(path: str) -> list[str]:
    """Column names of a TSV split; DataError when a required one is missing."""
    try:
        # the first line only: decoding the whole first buffer would blame line 1 for a later byte
        with open(path, "rb") as stream:
            first = stream.readline(1 << 20)  # a header is short; a CR-only file has no \n at all
        first = first.splitlines()[0] if first.strip() else b""
        header = first.decode("utf-8-sig").split("\t")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise DataError(f"cannot read the split ({exc.strerror})", path,
                        hint="pass a GRU4Rec TSV split such as rsc15_train_full.tsv") from None
    except UnicodeDecodeError:
        raise DataError("not a text file", path, 1,
                        hint="pass a GRU4Rec TSV split such as rsc15_train_full.tsv") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise DataError(f"header lacks column(s) {', '.join(missing)} "
                        f"(found {header!r})", path, 1,
                        hint="the first line must be SessionId<TAB>ItemId<TAB>Time")
    return header


def read_split(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (session, item, time) columns of a TSV split, in file order."""
    header = read_header(path)
    columns = tuple(header.index(name) for name in REQUIRED_COLUMNS)
    dtype = [("session", np.int64), ("item", np.int64), ("time", np.float64)]
    try:
        with warnings.catch_warnings():
            # a header-only split (e.g. an empty test set) is valid: no rows
            warnings.filterwarnings("ignore", message=".*input contained no data")
            table = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=columns,
                               dtype=dtype, comments=None, ndmin=1, encoding="utf-8")
    except ValueError as exc:
        line, what = find_bad_line(path, len(header), columns)
        raise DataError(what or f"unreadable row ({exc})", path, line,
                        hint="fix or remove the row") from None
    return table["session"], table["item"], table["time"]


def find_bad_line(path: str, n_columns: int, columns: tuple) -> tuple[int | None, str | None]:
    """Line-by-line check that finds the first row np.loadtxt rejected."""
    with open(path, encoding="utf-8", errors="replace", newline=None) as stream:
        next(stream, None)
        for line_no, line in enumerate(stream, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != n_columns:
                return line_no, f"expected {n_columns} tab-separated fields, found {len(fields)}"
            session, item, moment = (fields[i] for i in columns)
            for name, value in (("SessionId", session), ("ItemId", item)):
                if not (value.isascii() and value.isdigit()):
                    return line_no, f"{name} {value!r} is not a non-negative integer"
                if int(value) > INT64_MAX:
                    return line_no, (f"{name} {value} is larger than the largest id this pipeline "
                                     f"holds ({INT64_MAX})")
            try:
                float(moment)
            except ValueError:
                return line_no, f"Time {moment!r} is not a number"
    return None, None


def session_order(session: np.ndarray, item: np.ndarray, time: np.ndarray):
    """Items regrouped into sessions; returns (items in output order, session lengths).

    Within a session: time order, ties by file order.  Sessions: by first
    event time, ties by session id.
    """
    by_session = np.lexsort((time, session))  # stable: equal times keep file order
    session, item, time = session[by_session], item[by_session], time[by_session]
    if len(session) == 0:
        return item, np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(session[1:] != session[:-1]) + 1))
    lengths = np.diff(np.append(starts, len(session)))
    order = np.lexsort((session[starts], time[starts]))
    starts, lengths = starts[order], lengths[order]
    # row index of every output position: each session's start plus 0..length-1
    offsets = np.cumsum(lengths) - lengths
    rows = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
    return item[rows], lengths


def format_sessions(items: np.ndarray, lengths: np.ndarray) -> str:
    """Sessions as text: ids joined by single spaces, one session per line."""
    tokens = list(map(str, items.tolist()))
    separators = [" "] * len(tokens)
    for end in np.cumsum(lengths).tolist():
        separators[end - 1] = "\n"
    return "".join(token + separator for token, separator in zip(tokens, separators))


def convert(tsv_path: str, out_path: str) -> tuple[int, int]:
    """Write the sessions of one TSV split to `out_path`; returns (sessions, events).

    The output appears under its final name only once it is complete.
    """
    session, item, time = read_split(tsv_path)
    items, lengths = session_order(session, item, time)
    ends = np.cumsum(lengths)
    with atomic_file(out_path, encoding="ascii", newline="\n") as out:
        for first in range(0, len(lengths), WRITE_SESSIONS):
            last = min(first + WRITE_SESSIONS, len(lengths))
            begin = int(ends[first - 1]) if first else 0
            out.write(format_sessions(items[begin:int(ends[last - 1])],
                                      lengths[first:last]))
    log.info("%s: %d sessions, %d events → %s", tsv_path, len(lengths), len(items), out_path)
    return len(lengths), len(items)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        description="Convert a GRU4Rec TSV split into one session per line of "
                    "original item ids (sessions in order of their first event).")
    parser.add_argument("input", help="TSV split with header SessionId, ItemId, Time")
    parser.add_argument("output", help="text file to write")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        convert(args.input, args.output)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}, {exc.filename or args.output}; "
              "check the output path and free disk space", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
