"""data/download.py against an HTTP server on 127.0.0.1 started by the tests (no internet)."""
import hashlib
import http.server
import importlib.util
import logging
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "data", "download.py")
PAYLOAD = bytes((i * 7919 + 13) % 251 for i in range(300_000))
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FAST = ["--no-progress", "--backoff", "0", "--timeout", "10"]
# A raw clicks file: sessions 1-6 on 1 April (items 1, 2, 3: 6 clicks each once
# sessions 7-8 add 1 and 2), sessions 7-8 on 3 April → the test set.
CLICKS = "".join(
    f"{session},2014-04-0{1 if session <= 6 else 3}T10:0{position}:00.000Z,{item},0\n"
    for session in range(1, 9)
    for position, item in enumerate((1, 2, 3) if session <= 6 else (1, 2))).encode()


def load_download():
    name = "rsc15_data_download"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Handler(http.server.BaseHTTPRequestHandler):
    """/data.bin with Range support; /broken.bin cuts the first answer in half;
    /missing is a 404; /page is an HTML page."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        state = self.server.state
        state["requests"].append((self.path, self.headers.get("Range")))
        if self.path == "/missing":
            self.send_error(404, "Not Found")
        elif self.path == "/page":
            body = b"<html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/broken.bin" and state["breaks_left"] > 0:
            state["breaks_left"] -= 1
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True  # the client sees the connection drop midway
        elif self.path in ("/data.bin", "/broken.bin"):
            self.send_payload(PAYLOAD)
        elif self.path == "/yoochoose-clicks.dat":
            self.send_payload(CLICKS)
        else:
            self.send_error(404, "Not Found")

    def send_payload(self, payload):
        start = 0
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[len("bytes="):-1])
        if start >= len(payload) and requested:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(payload)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if requested else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload) - start))
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.end_headers()
        self.wfile.write(payload[start:])


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = {"requests": [], "breaks_left": 1}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def one_error_line(stderr):
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_success_with_checksum(server, tmp_path, capsys, caplog):
    httpd, base = server
    out = tmp_path / "raw" / "data.bin"
    code = load_download().main(["--url", f"{base}/data.bin", "--out", str(out),
                                 "--sha256", PAYLOAD_SHA256, *FAST])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "raw" / "data.bin.part").exists()
    # second run: the file is there, no request at all
    caplog.set_level(logging.INFO)
    count = len(httpd.state["requests"])
    assert load_download().main(["--url", f"{base}/data.bin", "--out", str(out), *FAST]) == 0
    assert len(httpd.state["requests"]) == count
    assert "already downloaded" in caplog.text


def test_broken_connection_is_retried_with_range(server, tmp_path, capsys):
    httpd, base = server
    out = tmp_path / "data.bin"
    code = load_download().main(["--url", f"{base}/broken.bin", "--out", str(out),
                                 "--retries", "2", *FAST])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes() == PAYLOAD
    first, second = httpd.state["requests"]
    assert first == ("/broken.bin", None)
    resumed_at = int(second[1][len("bytes="):-1])
    assert 0 < resumed_at <= len(PAYLOAD) // 2  # only the missing part was fetched again


def test_partial_file_is_resumed_by_the_next_run(server, tmp_path, capsys):
    httpd, base = server
    out = tmp_path / "data.bin"
    args = ["--url", f"{base}/broken.bin", "--out", str(out), "--retries", "0", *FAST]
    assert load_download().main(args) == 1
    error = one_error_line(capsys.readouterr().err)
    assert "rerun to resume" in error and "--raw" in error
    assert not out.exists()
    part = tmp_path / "data.bin.part"
    part_size = part.stat().st_size
    assert 0 < part_size <= len(PAYLOAD) // 2
    assert load_download().main(args) == 0
    assert out.read_bytes() == PAYLOAD and not part.exists()
    resumed_at = part_size
    assert httpd.state["requests"][-1] == ("/broken.bin", f"bytes={resumed_at}-")


def test_404_fails_without_output(server, tmp_path, capsys):
    _, base = server
    out = tmp_path / "data.bin"
    assert load_download().main(["--url", f"{base}/missing", "--out", str(out), *FAST]) == 1
    error = one_error_line(capsys.readouterr().err)
    assert "HTTP 404" in error and "--url" in error
    assert os.listdir(tmp_path) == []


def test_wrong_sha256_removes_the_file(server, tmp_path, capsys):
    _, base = server
    out = tmp_path / "data.bin"
    code = load_download().main(["--url", f"{base}/data.bin", "--out", str(out),
                                 "--sha256", "0" * 64, *FAST])
    assert code == 1
    error = one_error_line(capsys.readouterr().err)
    assert "sha256 mismatch" in error and PAYLOAD_SHA256 in error
    assert os.listdir(tmp_path) == []


def test_html_answer_is_rejected(server, tmp_path, capsys):
    _, base = server
    out = tmp_path / "data.bin"
    assert load_download().main(["--url", f"{base}/page", "--out", str(out), *FAST]) == 1
    error = one_error_line(capsys.readouterr().err)
    assert "HTML" in error and "--url" in error
    assert not out.exists()


def closed_port():
    """A local port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_host_says_how_to_use_a_local_copy(tmp_path):
    port = closed_port()
    result = subprocess.run(
        [sys.executable, SCRIPT, "--url", f"http://127.0.0.1:{port}/yoochoose-data.7z",
         "--out", str(tmp_path / "x.7z"), "--retries", "1", *FAST],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    error = one_error_line(result.stderr)
    assert f"cannot reach 127.0.0.1:{port}" in error
    assert "after 2 attempts" in error
    assert "sh data_prepare.sh --raw" in error
    assert os.listdir(tmp_path) == []


def test_bad_arguments_exit_2(tmp_path, capsys):
    download = load_download()
    assert download.main(["--url", "ftp://example/x", "--out", str(tmp_path / "x")]) == 2
    assert "--url" in one_error_line(capsys.readouterr().err)
    assert download.main(["--url", "http://127.0.0.1:1/x", "--out", str(tmp_path / "x"),
                          "--sha256", "abc"]) == 2
    assert "--sha256" in one_error_line(capsys.readouterr().err)


def test_extract_clicks_uses_7zip_or_says_what_to_do(tmp_path, monkeypatch):
    download = load_download()
    archive = tmp_path / "yoochoose-data.7z"
    archive.write_bytes(download.SEVEN_ZIP_MAGIC + b"rest of an archive")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(download.DownloadError, match="p7zip-full.*--raw"):
        download.extract_clicks(str(archive), str(tmp_path / "clicks.dat"))
    # a stand-in 7z that checks its arguments and prints the member to stdout
    fake = bin_dir / "7z"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $4" = "e -so yoochoose-clicks.dat" ] || exit 7\n'
                    'printf "1,2014-04-07T10:51:09.277Z,214536502,0\\n"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    dest = tmp_path / "clicks.dat"
    assert download.extract_clicks(str(archive), str(dest)) == str(dest)
    assert dest.read_text() == "1,2014-04-07T10:51:09.277Z,214536502,0\n"
    not_archive = tmp_path / "page.7z"
    not_archive.write_bytes(b"<html>")
    with pytest.raises(download.DownloadError, match="not a 7z archive"):
        download.extract_clicks(str(not_archive), str(tmp_path / "other.dat"))


def test_data_prepare_downloads_a_plain_clicks_url(server, tmp_path):
    httpd, base = server
    out = tmp_path / "out"
    config = os.path.join(REPO, "config.yaml")  # data_prepare.sh checks it would run before any work
    command = ["sh", os.path.join(REPO, "data_prepare.sh"), "--url",
               f"{base}/yoochoose-clicks.dat", "--out", str(out), "--config", str(config)]
    env = dict(os.environ, PYTHON=sys.executable)
    first = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stderr
    assert (out / "raw" / "yoochoose-clicks.dat").read_bytes() == CLICKS
    assert (out / "vocab.txt").read_text() == "1\n2\n3\n"
    assert (out / "all_test" / "test.txt").read_text() == "0 1\n0 1\n"
    requests_made = len(httpd.state["requests"])
    second = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert len(httpd.state["requests"]) == requests_made
