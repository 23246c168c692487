"""Download the RecSys Challenge 2015 data, resumably, and check it.

* Streams with ``requests`` into ``<out>.part`` and renames it to ``<out>``
  only once complete, so ``<out>`` is never a partial file.
* A ``.part`` left by an interrupted run is resumed with an HTTP Range
  request; a broken connection is retried with exponential back-off
  (``--retries``, ``--backoff``), each retry resuming where the last stopped.
* The size is checked against Content-Length / Content-Range, and the
  sha256 against ``--sha256`` when given.  An HTML answer (an error or
  login page served with status 200) is rejected.
* ``--extract-clicks PATH`` takes ``yoochoose-clicks.dat`` out of the
  downloaded ``.7z`` archive with the 7-Zip command line tool (``7z``,
  ``7za`` or ``7zr``, Debian package p7zip-full).  The py7zr package is
  deliberately not a dependency: this is a one-time step, py7zr pulls in
  several compiled packages, and the message tells how to finish by hand.

Exit codes: 0 done; 2 bad usage (malformed ``--url`` or ``--sha256``);
1 anything the network or server did (unreachable host, HTTP error, HTML
page, wrong size or checksum) or a missing extractor.  Every failure is one
``error:`` line saying what to do, including how to use a local copy instead
(``sh data_prepare.sh --raw PATH``).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data/ is not a package
from cli_common import UsageParser, run_main  # noqa: E402
from paddlerec.files import atomic_paths  # noqa: E402


log = logging.getLogger(__name__)

DEFAULT_URL = "https://s3-eu-west-1.amazonaws.com/yc-rdata/yoochoose-data.7z"
CLICKS_MEMBER = "yoochoose-clicks.dat"
# Bytes per read while streaming: requests only hands over full chunks, so a
# connection that breaks loses at most this much of what it had sent.
STREAM_CHUNK_BYTES = 64 * 1024
HASH_CHUNK_BYTES = 1 << 20
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
SEVEN_ZIP_MAGIC = b"7z\xbc\xaf\x27\x1c"
SEVEN_ZIP_TOOLS = ("7z", "7za", "7zr")
LOCAL_COPY_HINT = (f"to use a copy you already have, extract {CLICKS_MEMBER} from "
                   f"yoochoose-data.7z and run: sh data_prepare.sh --raw PATH/{CLICKS_MEMBER}")


class UsageError(Exception):
    """Bad arguments: exit code 2."""


class DownloadError(Exception):
    """The download failed for a reason outside the arguments: exit code 1."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, connected: bool):
        super().__init__(reason)
        self.connected = connected  # False when the host was never reached


def _short_reason(exc: BaseException) -> str:
    """The useful part of a requests/urllib3 error (``Connection refused``)."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1).strip()
    return type(exc).__name__ + (f": {text[:120]}" if text else "")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes 100-199/200`` or ``bytes */200``."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _is_html(response: requests.Response) -> bool:
    content_type = response.headers.get("Content-Type", "")
    return content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml")


def _fetch_once(session: requests.Session, url: str, part: str, timeout: float,
                progress: bool) -> int | None:
    """One request: append to (or start) `part`; returns the expected total size.

    Raises _Retryable when another attempt may succeed, DownloadError when not.
    """
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Accept-Encoding": "identity"}  # so sizes are the file's own
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _Retryable(_short_reason(exc), connected=False) from None
    with response:
        status = response.status_code
        if status == 416 and have:
            _, total = _content_range(response.headers.get("Content-Range"))
            if total == have:
                return total  # the partial file was complete already
            os.remove(part)
            raise _Retryable("server refused to resume; starting over", connected=True)
        if status in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status} {response.reason}", connected=True)
        if status >= 400:
            raise DownloadError(f"HTTP {status} {response.reason} for {url}; check --url, "
                                f"or {LOCAL_COPY_HINT}")
        if _is_html(response):
            raise DownloadError(f"{url} answered with an HTML page (Content-Type "
                                f"{response.headers.get('Content-Type')}), not the data file; "
                                f"check --url, or {LOCAL_COPY_HINT}")
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != have:
                os.remove(part)
                raise _Retryable(f"server resumed at byte {first}, not {have}; starting over",
                                 connected=True)
            mode = "ab"
        else:
            have, mode = 0, "wb"  # server ignored the Range header: start over
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as stream, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=os.path.basename(part), disable=not progress) as bar:
            try:
                for chunk in response.iter_content(STREAM_CHUNK_BYTES):
                    stream.write(chunk)
                    bar.update(len(chunk))
            except (requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ConnectionError,
                    requests.exceptions.Timeout) as exc:
                raise _Retryable(f"connection broken after {stream.tell()} bytes "
                                 f"({_short_reason(exc)})", connected=True) from None
    size = os.path.getsize(part)
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {size} of {total} bytes", connected=True)
    if total is not None and size > total:
        os.remove(part)
        raise DownloadError(f"received {size} bytes but the server announced {total}; "
                            "the partial file was removed, rerun to start over")
    return total


def sha256_of(path: str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_arguments(url: str, sha256: str | None) -> None:
    """UsageError for a URL requests cannot use or a malformed checksum."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url {url!r} is not an http(s) URL; pass e.g. --url {DEFAULT_URL}")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UsageError(f"--sha256 {sha256!r} is not 64 hex digits; pass the file's sha256")


def download(url: str, out: str, sha256: str | None = None, retries: int = 4,
             backoff: float = 2.0, timeout: float = 30.0, progress: bool = False,
             session: requests.Session | None = None) -> str:
    """Download `url` to `out` (resuming `out`.part); returns `out`.

    An existing `out` is kept (checked against `sha256` when given): a second
    run does no network work.
    """
    check_arguments(url, sha256)
    if os.path.exists(out):
        if sha256 and sha256_of(out) != sha256.lower():
            raise DownloadError(f"{out} exists but its sha256 is not {sha256}; "
                                "delete it to download again")
        log.info("%s already downloaded; skipping", out)
        return out
    directory = os.path.dirname(out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    part = out + ".part"
    session = session or requests.Session()
    failures: list[_Retryable] = []
    total = None
    while True:
        try:
            total = _fetch_once(session, url, part, timeout, progress)
            break
        except _Retryable as exc:
            failures.append(exc)
            if len(failures) > retries:
                raise _give_up(url, part, failures) from None
            delay = backoff * 2 ** (len(failures) - 1)
            log.warning("attempt %d failed: %s; retrying in %.1f s", len(failures), exc, delay)
            time.sleep(delay)
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise DownloadError(f"size mismatch: {size} bytes, expected {total}; rerun to resume")
    if sha256:
        actual = sha256_of(part)
        if actual != sha256.lower():
            os.remove(part)
            raise DownloadError(f"sha256 mismatch for {url}: expected {sha256.lower()}, got "
                                f"{actual}; the file was removed; check --sha256 and --url")
    os.replace(part, out)
    log.info("downloaded %s (%d bytes)", out, size)
    return out


def _give_up(url: str, part: str, failures: list) -> DownloadError:
    """The one-line error after the last attempt failed."""
    attempts = f"{len(failures)} attempt{'s' if len(failures) > 1 else ''}"
    if not any(failure.connected for failure in failures):
        host = urlsplit(url).netloc
        return DownloadError(f"cannot reach {host} ({failures[-1]}) after {attempts}; "
                             f"check the network, or {LOCAL_COPY_HINT}")
    kept = os.path.getsize(part) if os.path.exists(part) else 0
    resume = f" ({kept} bytes kept in {part}; rerun to resume)" if kept else ""
    return DownloadError(f"download of {url} failed after {attempts}: {failures[-1]}"
                         f"{resume}; rerun, or {LOCAL_COPY_HINT}")


def extract_clicks(archive: str, dest: str, member: str = CLICKS_MEMBER) -> str:
    """Extract `member` of the .7z `archive` to `dest` with the 7-Zip tool."""
    if os.path.exists(dest):
        log.info("%s already extracted; skipping", dest)
        return dest
    with open(archive, "rb") as stream:
        if stream.read(len(SEVEN_ZIP_MAGIC)) != SEVEN_ZIP_MAGIC:
            raise DownloadError(f"{archive} is not a 7z archive; check --url, or "
                                f"{LOCAL_COPY_HINT}")
    tool = next((path for path in map(shutil.which, SEVEN_ZIP_TOOLS) if path), None)
    if tool is None:
        raise DownloadError(f"downloaded {archive}, but extracting a .7z archive needs "
                            f"7-Zip, which is not installed; install it (apt-get install "
                            f"p7zip-full) and rerun, or run: 7z e {archive} {member} "
                            f"and then: sh data_prepare.sh --raw PATH/{member}")
    with atomic_paths(dest) as (temp,):
        with open(temp, "wb") as stream:
            result = subprocess.run([tool, "e", "-so", archive, member], stdout=stream,
                                    stderr=subprocess.PIPE, text=True)
        if result.returncode != 0 or os.path.getsize(temp) == 0:
            detail = (result.stderr or "").strip().splitlines()
            raise DownloadError(f"{os.path.basename(tool)} could not extract {member} from "
                                f"{archive} ({detail[-1] if detail else 'no output'}); "
                                f"extract it by hand and run: sh data_prepare.sh --raw "
                                f"PATH/{member}")
    log.info("extracted %s", dest)
    return dest


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        description="Download the YooChoose (RecSys Challenge 2015) data, resumably.")
    parser.add_argument("--url", default=DEFAULT_URL, help="default: %(default)s")
    parser.add_argument("--out", default=os.path.join("data", "raw", "yoochoose-data.7z"),
                        help="file to write (default: %(default)s)")
    parser.add_argument("--sha256", help="expected sha256 of the file (hex)")
    parser.add_argument("--extract-clicks", metavar="PATH",
                        help=f"extract {CLICKS_MEMBER} from the downloaded .7z to PATH")
    parser.add_argument("--retries", type=int, default=4,
                        help="further attempts after a failure (default: %(default)s)")
    parser.add_argument("--backoff", type=float, default=2.0,
                        help="seconds before the first retry, doubling each time "
                             "(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the server (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    if args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        print("error: --retries and --backoff must be >= 0 and --timeout > 0; "
              "see --help", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        path = download(args.url, args.out, args.sha256, args.retries, args.backoff,
                        args.timeout, progress)
        if args.extract_clicks:
            extract_clicks(path, args.extract_clicks)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}, {exc.filename or args.out}; "
              "check the output path and free disk space", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
