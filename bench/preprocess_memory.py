"""Peak memory and wall time of data/preprocess.py on a realistic synthetic file.

The real yoochoose-clicks.dat has 33,003,944 clicks in 9,249,729 sessions on
52,739 items (1.4 GB).  This benchmark writes a synthetic file of the same
shape (``--fraction`` scales rows, sessions and items together), runs
preprocess.py on it in a child process, and reports the child's peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time.

The synthetic data imitates what drives memory and time: session lengths
(geometric, mean 3.57, 28% of length 1), Zipf-like item popularity,
six months of timestamps, ~45-byte lines, and a file that is not perfectly
sorted so the sort path of preprocess.py runs.

Usage (from the repo root)::

    .venv/bin/python bench/preprocess_memory.py            # full size
    .venv/bin/python bench/preprocess_memory.py --fraction 0.1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

FULL_ROWS = 33_003_944
FULL_SESSIONS = 9_249_729
FULL_ITEMS = 52_739
START_US = 1_396_310_400 * 1_000_000   # 2014-04-01T00:00:00Z
SPAN_US = 183 * 86_400 * 1_000_000      # to 2014-10-01
SESSIONS_PER_CHUNK = 500_000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def session_lengths(rng, n_sessions: int, n_rows: int) -> np.ndarray:
    """Geometric lengths (>= 1) adjusted so they add up to exactly n_rows."""
    lengths = rng.geometric(n_sessions / n_rows, size=n_sessions).astype(np.int64)
    gap = n_rows - int(lengths.sum())
    while gap != 0:
        picks = rng.integers(0, n_sessions, size=abs(gap))
        if gap > 0:
            np.add.at(lengths, picks, 1)
        else:
            picks = picks[lengths[picks] > 1]
            picks = np.unique(picks)[: -gap]
            lengths[picks] -= 1
        gap = n_rows - int(lengths.sum())
    return lengths


def _digits(values: np.ndarray, width: int | None = None) -> np.ndarray:
    """Right-aligned ASCII digits with NUL padding (zero-padded when width given)."""
    pad = width is None
    width = width or len(str(int(values.max())))
    out = np.empty((len(values), width), dtype=np.uint8)
    rest = values.copy()
    for k in range(width):
        quotient = rest // 10
        digit = (rest - quotient * 10).astype(np.uint8) + 48
        out[:, width - 1 - k] = np.where((rest > 0) | (k == 0) | (not pad), digit, 0)
        rest = quotient
    return out


def _civil_from_days(days: np.ndarray):
    """(year, month, day) of days since 1970-01-01, vectorised."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    return yoe + era * 400 + (month <= 2), month, day


def iso_columns(time_ms: np.ndarray) -> np.ndarray:
    """``YYYY-MM-DDTHH:MM:SS.fffZ`` as an (n, 24) byte matrix."""
    seconds, milli = np.divmod(time_ms, 1000)
    days, second_of_day = np.divmod(seconds, 86_400)
    year, month, day = _civil_from_days(days)
    hour, rest = np.divmod(second_of_day, 3600)
    minute, second = np.divmod(rest, 60)
    n = len(time_ms)

    def const(text):
        return np.tile(np.frombuffer(text, dtype=np.uint8), (n, 1))

    return np.hstack([_digits(year, 4), const(b"-"), _digits(month, 2), const(b"-"),
                      _digits(day, 2), const(b"T"), _digits(hour, 2), const(b":"),
                      _digits(minute, 2), const(b":"), _digits(second, 2), const(b"."),
                      _digits(milli, 3), const(b"Z")])


def write_synthetic(path: str, n_rows: int, n_sessions: int, n_items: int,
                    seed: int = 0) -> None:
    """Write a raw clicks file of the given shape (see the module docstring)."""
    rng = np.random.default_rng(seed)
    lengths = session_lengths(rng, n_sessions, n_rows)
    starts_us = START_US + np.sort(rng.integers(0, SPAN_US, size=n_sessions))
    item_ids = 214_500_000 + rng.choice(429_400_000, size=n_items, replace=False)
    popularity = 1.0 / (np.arange(n_items) + 10.0) ** 0.95
    popularity /= popularity.sum()
    with open(path, "wb") as out:
        for first in range(0, n_sessions, SESSIONS_PER_CHUNK):
            lens = lengths[first:first + SESSIONS_PER_CHUNK]
            count = int(lens.sum())
            session = np.repeat(np.arange(first + 1, first + 1 + len(lens)), lens)
            offsets = rng.exponential(60e6, size=count).astype(np.int64)
            cumulative = np.cumsum(offsets)
            # time since the session's first click: 0 for the first, then growing
            within = cumulative - np.repeat(cumulative[np.cumsum(lens) - lens], lens)
            time_ms = (np.repeat(starts_us[first:first + len(lens)], lens) + within) // 1000
            item = item_ids[rng.choice(n_items, size=count, p=popularity)]
            # a little disorder, as in real logs: swap 0.1% of neighbouring rows
            pairs = max(1, (count - 1) // 2)
            swap = 2 * np.unique(rng.integers(0, pairs, size=max(1, count // 1000)))
            swap = swap[swap + 1 < count]  # disjoint pairs (2j, 2j+1)
            for column in (session, time_ms, item):
                column[swap], column[swap + 1] = column[swap + 1].copy(), column[swap].copy()
            category = rng.random(count) < 0.9
            n = count

            def const(byte):
                return np.full((n, 1), byte, dtype=np.uint8)

            matrix = np.hstack([_digits(session), const(44), iso_columns(time_ms), const(44),
                                _digits(item), const(44),
                                np.where(category[:, None], const(48), const(83)), const(10)])
            out.write(matrix[matrix != 0].tobytes())


def measure_preprocess(raw: str, out_prefix: str) -> dict:
    """Run preprocess.py as a child; return its wall time and peak RSS.

    Linux carries a process's peak RSS across fork+exec, so the parent that
    spawns preprocess.py must itself be small: main() calls this in a fresh
    interpreter (``--measure``) that has not generated anything.
    """
    command = [sys.executable, os.path.join(REPO, "data", "preprocess.py"), raw,
               "--out-prefix", out_prefix]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"returncode": result.returncode, "wall_s": wall,
            "peak_rss_bytes": peak_kib * 1024, "stdout": result.stdout,
            "stderr": result.stderr}


def _run_self(*args: str) -> str:
    """Run this script again in a fresh interpreter; return its stdout."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench step {args[0]} failed:\n{result.stderr}")
    return result.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="size relative to the real file (default: 1.0 = full size)")
    parser.add_argument("--workdir", help="where to write the files (default: a temp dir, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generate", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("RAW", "PREFIX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = int(FULL_ROWS * args.fraction)
    sessions = int(FULL_SESSIONS * args.fraction)
    items = max(100, int(FULL_ITEMS * args.fraction))
    if args.generate:
        write_synthetic(args.generate, rows, sessions, items, args.seed)
        return 0
    if args.measure:
        print(json.dumps(measure_preprocess(*args.measure)))
        return 0

    workdir = args.workdir or tempfile.mkdtemp(prefix="preprocess_bench_")
    os.makedirs(workdir, exist_ok=True)
    try:
        raw = os.path.join(workdir, "synthetic-clicks.dat")
        started = time.perf_counter()
        _run_self("--generate", raw, "--fraction", str(args.fraction),
                  "--seed", str(args.seed))
        generated = time.perf_counter() - started
        size = os.path.getsize(raw)
        print(f"synthetic file: {rows:,} rows, {sessions:,} sessions, {items:,} items, "
              f"{size / 1e9:.2f} GB (written in {generated:.0f} s)")
        result = json.loads(_run_self("--measure", raw, os.path.join(workdir, "rsc15")))
        if result["returncode"] != 0:
            raise SystemExit(f"preprocess failed ({result['returncode']}):\n{result['stderr']}")
        print(result["stdout"])
        print(f"preprocess.py: peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"wall time {result['wall_s']:.0f} s ({os.cpu_count()} cores)")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
