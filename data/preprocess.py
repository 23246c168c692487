"""Turn the raw RecSys Challenge 2015 clicks into GRU4Rec train/test splits.

Input: ``yoochoose-clicks.dat``, headerless lines
``SessionID,Timestamp,ItemID,Category`` with timestamps such as
``2014-04-07T10:51:09.277Z`` (UTC).  About 33 million lines, 1.4 GB.

The protocol is the one of the official GRU4Rec RSC15 preprocessing, with the
known defects of older copies removed (no ``header=0`` on a headerless file,
timestamps read as UTC instead of local time):

1. drop sessions of length 1;
2. drop clicks on items with fewer than 5 clicks (counted after step 1);
3. drop sessions shorter than 2 (counted after step 2).  One pass of each,
   in this order, exactly as the reference does.
4. test = sessions whose last click is at or after ``tmax - 86400 s``,
   ``tmax`` being the latest click left after step 3; train_full = the rest.
   Test clicks on items absent from train_full are dropped, then test
   sessions shorter than 2.
5. The same split applied to train_full gives train_tr / train_valid.

Times are kept as integer microseconds so the split boundary is exact, and
written as decimal unix seconds (``1396867869.277``).

The file is read in blocks of bytes and parsed with vectorised numpy code (one
int64 per column and row, no Python object per row), so the whole file fits in
well under 4 GB; see ``bench/preprocess_memory.py`` for the measurement.
Lines the fast parser does not accept are re-parsed one by one by
``parse_row``, which is the reference for what a valid row is and names the
reason when it is not.
"""
from __future__ import annotations

import argparse
import calendar
import datetime as _dt
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data/ is not a package
from cli_common import DataError, UsageParser, run_main  # noqa: E402
from paddlerec.files import atomic_paths  # noqa: E402


log = logging.getLogger(__name__)

US_PER_SECOND = 1_000_000
DAY_US = 86_400 * US_PER_SECOND
MIN_ITEM_SUPPORT = 5
MIN_SESSION_LENGTH = 2
MAX_ID_DIGITS = 18  # fits int64 without overflow checks
MAX_SHOWN_MALFORMED = 5
DEFAULT_BLOCK_BYTES = 32 * 1024 * 1024
WRITE_ROWS = 1_000_000
TSV_HEADER = b"SessionId\tItemId\tTime\n"
SPLIT_NAMES = ("train_full", "test", "train_tr", "train_valid")

_INT_RE = re.compile(rb"[0-9]{1,%d}\Z" % MAX_ID_DIGITS)
_TIMESTAMP_RE = re.compile(
    rb"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    rb"(?:\.([0-9]{1,6}))?Z?\Z"
)
# Canonical timestamp layout handled by the vectorised parser:
# 2014-04-07T10:51:09.277Z
_TS_WIDTH = 24
_TS_SEPARATORS = ((4, b"-"), (7, b"-"), (10, b"T"), (13, b":"), (16, b":"),
                  (19, b"."), (23, b"Z"))
_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31],
                          dtype=np.int64)


class RowError(ValueError):
    """One malformed input row; the message says what is wrong with it."""


@dataclass
class Malformed:
    """Malformed rows met while reading: a count and the first few examples."""

    count: int = 0
    examples: list = field(default_factory=list)  # (line_no, reason, text)

    def add(self, line_no: int, reason: str, text: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_SHOWN_MALFORMED:
            self.examples.append((line_no, reason, text))


@dataclass
class Clicks:
    """Parallel int64 columns, one entry per click."""

    session: np.ndarray
    time_us: np.ndarray
    item: np.ndarray

    def __len__(self) -> int:
        return len(self.session)

    def take(self, index: np.ndarray) -> "Clicks":
        """Subset by boolean mask or index array (copies)."""
        return Clicks(self.session[index], self.time_us[index], self.item[index])


@dataclass
class SplitStats:
    """What the statistics table shows for one split."""

    name: str
    events: int
    sessions: int
    items: int
    first_us: int | None
    last_us: int | None


# --------------------------------------------------------------------------
# parsing


def parse_row(raw: bytes) -> tuple[int, int, int]:
    """Parse one raw line (without its newline) into (session, time_us, item).

    This is the definition of a valid row; the vectorised parser is only a
    faster route to the same answer for the canonical layout.  Raises
    RowError naming what is wrong.
    """
    text = raw.rstrip(b"\r")
    if not text.strip():
        raise RowError("blank line")
    fields = text.split(b",")
    if len(fields) != 4:
        raise RowError(f"expected 4 comma-separated fields "
                       f"(SessionID,Timestamp,ItemID,Category), found {len(fields)}")
    session, stamp, item, _category = fields
    for name, value in (("session id", session), ("item id", item)):
        if _INT_RE.match(value):
            continue
        if value.isdigit():  # reported as written, not as what an int64 would make of it
            raise RowError(f"{name} {value.decode('ascii')} has more than {MAX_ID_DIGITS} digits, "
                           f"more than this pipeline holds")
        hint = " (a header line?)" if name == "session id" and value.strip().isalpha() else ""
        raise RowError(f"{name} {_show(value)} is not a non-negative integer{hint}")
    return int(session), parse_timestamp(stamp), int(item)


def parse_timestamp(stamp: bytes) -> int:
    """ISO-8601 UTC timestamp (``2014-04-07T10:51:09.277Z``) → unix microseconds."""
    match = _TIMESTAMP_RE.match(stamp)
    if not match:
        raise RowError(f"bad timestamp {_show(stamp)} "
                       f"(expected like 2014-04-07T10:51:09.277Z)")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = match.group(7) or b""
    try:
        _dt.datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise RowError(f"bad timestamp {_show(stamp)} ({exc})") from None
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if seconds < 0:
        raise RowError(f"bad timestamp {_show(stamp)} (before 1970)")
    return seconds * US_PER_SECOND + int(fraction.ljust(6, b"0"))


def _show(value: bytes, limit: int = 60) -> str:
    """Printable, bounded rendering of raw bytes for messages."""
    text = value.decode("utf-8", "replace")
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def _parse_digits(buf: np.ndarray, start: np.ndarray, end: np.ndarray):
    """Parse the decimal numbers buf[start:end] of many fields at once.

    Returns (values, ok); ok is False where the field is empty, too long or
    holds anything but ASCII digits.
    """
    width = end - start
    ok = (width >= 1) & (width <= MAX_ID_DIGITS)
    values = np.zeros(len(start), dtype=np.int64)
    if not ok.any():
        return values, ok
    last = len(buf) - 1
    for k in range(int(width[ok].max())):
        has = ok & (width > k)
        digit = buf[np.where(has, np.minimum(end - 1 - k, last), 0)].astype(np.int64) - 48
        ok &= ~has | ((digit >= 0) & (digit <= 9))
        values += np.where(has, digit, 0) * (10 ** k)
    return values, ok


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 for proleptic Gregorian dates (vectorised)."""
    year = year - (month <= 2)
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + np.where(month > 2, -3, 9)) + 2) // 5 + day - 1
    day_of_era = (year_of_era * 365 + year_of_era // 4 - year_of_era // 100
                  + day_of_year)
    return era * 146097 + day_of_era - 719468


def _parse_timestamps(buf: np.ndarray, start: np.ndarray, end: np.ndarray):
    """Vectorised parser for the canonical ``YYYY-MM-DDTHH:MM:SS.fffZ`` form.

    Returns (time_us, ok).  Rows with ok False are left to parse_row, which
    either accepts another valid spelling or names the problem.
    """
    ok = (end - start) == _TS_WIDTH
    base = np.where(ok, start, 0)
    last = len(buf) - 1

    def char(offset):
        return buf[np.minimum(base + offset, last)]

    for offset, sep in _TS_SEPARATORS:
        ok &= char(offset) == sep[0]

    def number(first, count):
        nonlocal ok
        value = np.zeros(len(start), dtype=np.int64)
        for offset in range(first, first + count):
            digit = char(offset).astype(np.int64) - 48
            ok &= (digit >= 0) & (digit <= 9)
            value = value * 10 + digit
        return value

    year, month, day = number(0, 4), number(5, 2), number(8, 2)
    hour, minute, second, milli = number(11, 2), number(14, 2), number(17, 2), number(20, 3)
    ok &= (year >= 1970) & (month >= 1) & (month <= 12) & (day >= 1)
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_index = np.clip(month, 1, 12) - 1
    ok &= day <= _DAYS_IN_MONTH[month_index] + (leap & (month == 2))
    days = _days_from_civil(year, month, day)
    seconds = days * 86_400 + hour * 3_600 + minute * 60 + second
    return (seconds * 1_000 + milli) * 1_000, ok


def parse_block(block: bytes, first_line: int, malformed: Malformed,
                path: str, strict: bool) -> Clicks:
    """Parse a block of whole lines (ending with a newline) into Clicks.

    Valid rows keep their file order.  Malformed rows are recorded in
    `malformed`, or raise DataError at once when `strict`.
    """
    buf = np.frombuffer(block, dtype=np.uint8)
    newline = np.flatnonzero(buf == 10)
    n_lines = len(newline)
    starts = np.empty(n_lines, dtype=np.int64)
    starts[:1] = 0
    starts[1:] = newline[:-1] + 1
    ends = newline.astype(np.int64)
    ends -= (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)  # CRLF
    commas = np.flatnonzero(buf == 44)
    lo = np.searchsorted(commas, starts)
    four_fields = (np.searchsorted(commas, ends) - lo) == 3

    session = np.zeros(n_lines, dtype=np.int64)
    time_us = np.zeros(n_lines, dtype=np.int64)
    item = np.zeros(n_lines, dtype=np.int64)
    valid = np.zeros(n_lines, dtype=bool)

    rows = np.flatnonzero(four_fields)
    if len(rows):
        first_comma = lo[rows]
        c1, c2, c3 = commas[first_comma], commas[first_comma + 1], commas[first_comma + 2]
        s_val, s_ok = _parse_digits(buf, starts[rows], c1)
        t_val, t_ok = _parse_timestamps(buf, c1 + 1, c2)
        i_val, i_ok = _parse_digits(buf, c2 + 1, c3)
        good = s_ok & t_ok & i_ok
        session[rows], time_us[rows], item[rows] = s_val, t_val, i_val
        valid[rows] = good

    for index in np.flatnonzero(~valid).tolist():
        raw = block[starts[index]:newline[index]]
        try:
            session[index], time_us[index], item[index] = parse_row(raw)
        except RowError as exc:
            line_no = first_line + index
            if strict:
                raise DataError(f"malformed row ({exc})", path, line_no,
                                "fix or remove the row, or run without --strict "
                                "to skip malformed rows") from None
            malformed.add(line_no, str(exc), raw.decode("utf-8", "replace"))
            continue
        valid[index] = True

    keep = np.flatnonzero(valid)
    return Clicks(session[keep], time_us[keep], item[keep])


def iter_blocks(stream, block_bytes: int):
    """Yield (first_line_number, bytes) pieces of a binary stream cut at newlines.

    A final line without a newline gets one, so every piece ends with b"\\n". A file whose
    lines end in a lone b"\\r" (old Mac tools) is read as if they ended in b"\\n": otherwise it
    would be one line, and every click a malformed row.
    """
    carry = b""
    line_no = 1
    cr_only = None  # decided on the first block
    while True:
        chunk = stream.read(block_bytes)
        if not chunk:
            break
        if cr_only is None:
            cr_only = b"\r" in chunk and b"\n" not in chunk
        if cr_only:
            chunk = chunk.replace(b"\r", b"\n")
        chunk = carry + chunk if carry else chunk
        cut = chunk.rfind(b"\n") + 1
        if cut == 0:
            carry = chunk
            continue
        piece, carry = chunk[:cut], chunk[cut:]
        yield line_no, piece
        line_no += piece.count(b"\n")
    if carry:
        yield line_no, carry + b"\n"


def read_clicks(path: str, strict: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
                progress: bool = False) -> tuple[Clicks, Malformed]:
    """Read a raw clicks file into int64 columns, in file order (a byte progress bar if asked)."""
    malformed = Malformed()
    parts: list[Clicks] = []
    try:
        with open(path, "rb") as stream, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                               desc="preprocess: reading", disable=not progress,
                                               leave=False) as bar:
            for first_line, block in iter_blocks(stream, block_bytes):
                parts.append(parse_block(block, first_line, malformed, path, strict))
                bar.update(len(block))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise DataError(f"cannot read the input ({exc.strerror})", path,
                        hint="pass the path of yoochoose-clicks.dat") from None
    columns = []
    for name in ("session", "time_us", "item"):
        # Concatenate one column at a time and drop its pieces straight away,
        # so the peak is the pieces plus one column, not two full copies.
        columns.append(np.concatenate([getattr(p, name) for p in parts])
                       if parts else np.zeros(0, dtype=np.int64))
        for part in parts:
            setattr(part, name, None)
    return Clicks(*columns), malformed


# --------------------------------------------------------------------------
# protocol


def sort_by_session_time(clicks: Clicks) -> Clicks:
    """Group rows by session id (ascending), time order inside; ties keep file order."""
    if len(clicks) < 2:
        return clicks
    d_session = np.diff(clicks.session)
    d_time = np.diff(clicks.time_us)
    in_order = bool(np.all((d_session > 0) | ((d_session == 0) & (d_time >= 0))))
    del d_session, d_time
    if in_order:
        return clicks
    order = np.lexsort((clicks.time_us, clicks.session))  # stable
    return clicks.take(order)


def session_starts(session: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal session ids (rows grouped)."""
    if len(session) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    starts = np.concatenate(([0], np.flatnonzero(session[1:] != session[:-1]) + 1))
    lengths = np.diff(np.append(starts, len(session)))
    return starts, lengths


def drop_short_sessions(clicks: Clicks, min_length: int) -> Clicks:
    """Drop every session with fewer than `min_length` rows (rows grouped)."""
    _, lengths = session_starts(clicks.session)
    keep = np.repeat(lengths >= min_length, lengths)
    return clicks.take(keep)


def drop_rare_items(clicks: Clicks, min_support: int) -> Clicks:
    """Drop clicks on items clicked fewer than `min_support` times."""
    items, counts = np.unique(clicks.item, return_counts=True)
    return clicks.take(isin_sorted(clicks.item, items[counts >= min_support]))


def isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values ∈ sorted_set, element-wise, for a sorted unique int array."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    np.minimum(pos, len(sorted_set) - 1, out=pos)
    return sorted_set[pos] == values


def filter_sessions_and_items(clicks: Clicks) -> Clicks:
    """Steps 1-3 of the protocol: one pass each, in the reference's order."""
    clicks = drop_short_sessions(clicks, 2)
    clicks = drop_rare_items(clicks, MIN_ITEM_SUPPORT)
    return drop_short_sessions(clicks, MIN_SESSION_LENGTH)


def split_last_day(clicks: Clicks) -> tuple[Clicks, Clicks]:
    """Split off the sessions whose last click is within the final 86,400 s.

    A session whose last click is exactly ``tmax - 86400 s`` goes to the second
    part (``>=``, as in the reference).  Then the second part loses the clicks on
    items the first part lacks, and the sessions left shorter than 2.
    """
    if len(clicks) == 0:
        return clicks, clicks
    starts, lengths = session_starts(clicks.session)
    session_last = np.maximum.reduceat(clicks.time_us, starts)
    late = np.repeat(session_last >= clicks.time_us.max() - DAY_US, lengths)
    early_part = clicks.take(~late)
    late_part = clicks.take(late)
    del late
    late_part = late_part.take(isin_sorted(late_part.item, np.unique(early_part.item)))
    return early_part, drop_short_sessions(late_part, MIN_SESSION_LENGTH)


def split_stats(name: str, clicks: Clicks) -> SplitStats:
    """Events, sessions and items of one split."""
    if len(clicks) == 0:
        return SplitStats(name, 0, 0, 0, None, None)
    starts, _ = session_starts(clicks.session)
    return SplitStats(name, len(clicks), len(starts), len(np.unique(clicks.item)),
                      int(clicks.time_us.min()), int(clicks.time_us.max()))


# --------------------------------------------------------------------------
# writing


def _int_columns(values: np.ndarray) -> np.ndarray:
    """Non-negative ints → right-aligned ASCII digits, NUL padding on the left."""
    width = len(str(int(values.max()))) if len(values) else 1
    out = np.empty((len(values), width), dtype=np.uint8)
    rest = values.copy()
    for k in range(width):
        quotient = rest // 10
        digit = (rest - quotient * 10).astype(np.uint8) + 48
        out[:, width - 1 - k] = digit if k == 0 else np.where(rest > 0, digit, 0)
        rest = quotient
    return out


def _fraction_columns(micros: np.ndarray) -> np.ndarray:
    """Microseconds → the 6 fraction digits without trailing zeros (at least one)."""
    out = np.empty((len(micros), 6), dtype=np.uint8)
    rest = micros.copy()
    significant = np.zeros(len(micros), dtype=bool)
    for k in range(6):
        quotient = rest // 10
        digit = rest - quotient * 10
        significant |= digit != 0
        out[:, 5 - k] = np.where(significant | (k == 5), digit.astype(np.uint8) + 48, 0)
        rest = quotient
    return out


def format_tsv_rows(clicks: Clicks) -> bytes:
    """``session<TAB>item<TAB>seconds.fraction\\n`` for every row, vectorised.

    Each row is laid out in a fixed-width byte matrix with NUL padding; dropping
    the NULs leaves exactly the concatenated text.
    """
    n = len(clicks)
    if n == 0:
        return b""
    seconds = clicks.time_us // US_PER_SECOND

    def const(byte):
        return np.full((n, 1), byte, dtype=np.uint8)

    matrix = np.hstack([
        _int_columns(clicks.session), const(9), _int_columns(clicks.item), const(9),
        _int_columns(seconds), const(46),
        _fraction_columns(clicks.time_us - seconds * US_PER_SECOND), const(10),
    ])
    return matrix[matrix != 0].tobytes()


def write_tsv(path: str, clicks: Clicks) -> None:
    """Write one split in GRU4Rec TSV form (header, rows as they are)."""
    with open(path, "wb") as out:
        out.write(TSV_HEADER)
        for begin in range(0, len(clicks), WRITE_ROWS):
            out.write(format_tsv_rows(clicks.take(slice(begin, begin + WRITE_ROWS))))


def split_paths(out_prefix: str) -> dict:
    """Output file of each split for a prefix such as ``data/prepared/rsc15``."""
    return {name: f"{out_prefix}_{name}.tsv" for name in SPLIT_NAMES}


def _write_outputs_atomically(paths: dict, splits: dict) -> None:
    """Write all splits under hidden temporary names, then rename them into place (all or none)."""
    with atomic_paths(*(paths[name] for name in SPLIT_NAMES)) as temps:
        for name, temp in zip(SPLIT_NAMES, temps):
            write_tsv(temp, splits[name])
            log.info("wrote %s (%d rows)", paths[name], len(splits[name]))


# --------------------------------------------------------------------------
# driver


def preprocess(input_path: str, out_prefix: str, strict: bool = False,
               block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False) -> list:
    """Run the whole protocol on `input_path`; returns the SplitStats rows.

    Writes ``<out_prefix>_{train_full,test,train_tr,train_valid}.tsv``, all or
    none.  Raises DataError for unusable input.
    """
    clicks, malformed = read_clicks(input_path, strict, block_bytes, progress)
    report_malformed(input_path, malformed)
    if len(clicks) == 0:
        raise DataError("no valid click rows", input_path,
                        hint="expected lines like "
                             "'1,2014-04-07T10:51:09.277Z,214536502,0'")
    clicks = sort_by_session_time(clicks)
    stats = [split_stats("raw", clicks)]
    clicks = filter_sessions_and_items(clicks)
    if len(clicks) == 0:
        raise DataError("no sessions left after the filters (sessions of length "
                        f">= 2 on items with >= {MIN_ITEM_SUPPORT} clicks)",
                        input_path, hint="the input is too small for the RSC15 protocol")
    stats.append(split_stats("filtered", clicks))
    train_full, test = split_last_day(clicks)
    del clicks
    train_tr, train_valid = split_last_day(train_full)
    splits = {"train_full": train_full, "test": test,
              "train_tr": train_tr, "train_valid": train_valid}
    stats.extend(split_stats(name, splits[name]) for name in SPLIT_NAMES)
    paths = split_paths(out_prefix)
    directory = os.path.dirname(out_prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    _write_outputs_atomically(paths, splits)
    return stats


def report_malformed(path: str, malformed: Malformed) -> None:
    """Log how many rows were skipped and show the first few."""
    if not malformed.count:
        return
    log.warning("skipped %d malformed row(s) in %s; first %d:", malformed.count,
                path, len(malformed.examples))
    for line_no, reason, text in malformed.examples:
        log.warning("  %s:%d: %s: %s", path, line_no, reason,
                    _show(text.encode("utf-8"), 80))


def format_stats(stats: list) -> str:
    """The statistics table as text."""
    def when(us):
        if us is None:
            return "-"
        moment = _dt.datetime.fromtimestamp(us // US_PER_SECOND, _dt.timezone.utc)
        return moment.strftime("%Y-%m-%d %H:%M:%S")

    header = ("split", "events", "sessions", "items", "first click (UTC)",
              "last click (UTC)")
    rows = [header] + [(s.name, f"{s.events:,}", f"{s.sessions:,}", f"{s.items:,}",
                        when(s.first_us), when(s.last_us)) for s in stats]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        description="Preprocess yoochoose-clicks.dat into GRU4Rec TSV splits "
                    "(official RSC15 protocol, UTC times).")
    parser.add_argument("input", help="raw clicks file (yoochoose-clicks.dat)")
    parser.add_argument("--out-prefix", required=True,
                        help="output prefix, e.g. data/prepared/rsc15 → "
                             "data/prepared/rsc15_train_full.tsv, ...")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first malformed row (exit code 2)")
    parser.add_argument("--block-mb", type=float, default=DEFAULT_BLOCK_BYTES / 2**20,
                        help="bytes read per block, in MiB (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a terminal)")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    block_bytes = int(args.block_mb * 2**20)
    if block_bytes < 1:
        print("error: --block-mb must be positive; pass e.g. --block-mb 32",
              file=sys.stderr)
        return 2
    try:
        progress = not args.no_progress and sys.stderr.isatty()
        stats = preprocess(args.input, args.out_prefix, args.strict, block_bytes, progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}, {exc.filename or args.input}; "
              "check the paths and free disk space", file=sys.stderr)
        return 1
    print(format_stats(stats))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
