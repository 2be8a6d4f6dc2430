import hashlib
import http.server
import os
import re
import socket
import threading

import pytest

from metaphi.tasks import DataError
from metaphi.tasks.download import download, file_hash

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A local HTTP server in a thread, serving PAYLOAD at /file.zip; it records each request's Range
    header and how many bytes it sent."""

    def __init__(self, ranges: bool = True, cut_at: int | None = None):
        self.ranges, self.cut_at = ranges, cut_at
        self.requests: list[str | None] = []
        self.sent = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path != "/file.zip":
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                outer.requests.append(header)
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", header or "")
                if outer.ranges and match:
                    start = int(match.group(1))
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_at is not None:  # promise everything, send part, hang up
                    body = body[: outer.cut_at]
                self.wfile.write(body)
                outer.sent += len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_full_download_checks_hash_and_leaves_no_part(tmp_path):
    dest = tmp_path / "sub" / "file.zip"
    with Server() as server:
        assert download(server.url, dest, SHA, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "file.zip.part").exists()
    assert server.requests == [None]


def test_existing_file_is_not_fetched_again(tmp_path):
    dest = tmp_path / "file.zip"
    dest.write_bytes(PAYLOAD)
    with Server() as server:
        download(server.url, dest, SHA, progress=False)
    assert server.requests == []


def test_existing_file_with_wrong_hash_is_reported_and_kept(tmp_path):
    dest = tmp_path / "file.zip"
    dest.write_bytes(b"something else")
    with pytest.raises(DataError, match="sha256 mismatch.*delete it and download it again"):
        download("http://127.0.0.1:9/file.zip", dest, SHA, progress=False)
    assert dest.exists()


def test_resume_asks_for_the_rest_only(tmp_path):
    dest = tmp_path / "file.zip"
    (tmp_path / "file.zip.part").write_bytes(PAYLOAD[:100_000])
    with Server() as server:
        download(server.url, dest, SHA, progress=True)
    assert server.requests == ["bytes=100000-"]
    assert server.sent == len(PAYLOAD) - 100_000
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    dest = tmp_path / "file.zip"
    (tmp_path / "file.zip.part").write_bytes(b"x" * 5000)  # even a wrong prefix is thrown away
    with Server(ranges=False) as server:
        download(server.url, dest, SHA, progress=False)
    assert server.requests == ["bytes=5000-"] and server.sent == len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD


def test_part_as_long_as_the_file_restarts_after_416(tmp_path):
    dest = tmp_path / "file.zip"
    (tmp_path / "file.zip.part").write_bytes(b"y" * len(PAYLOAD))
    with Server() as server:
        download(server.url, dest, SHA, progress=False)
    assert server.requests == [f"bytes={len(PAYLOAD)}-", None]
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_part_and_resumes(tmp_path):
    dest = tmp_path / "file.zip"
    with Server(cut_at=120_000) as server:
        with pytest.raises(DataError, match=r"stopped at 120000 of 300000 bytes.*run again to resume"):
            download(server.url, dest, SHA, progress=False)
    assert (tmp_path / "file.zip.part").stat().st_size == 120_000 and not dest.exists()
    with Server() as server:
        download(server.url, dest, SHA, progress=False)
    assert server.requests == ["bytes=120000-"]
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_names_file_and_hashes_and_removes_it(tmp_path):
    dest = tmp_path / "file.zip"
    wrong = "0" * 64
    with Server() as server:
        with pytest.raises(DataError) as err:
            download(server.url, dest, wrong, progress=False)
    msg = str(err.value)
    assert "file.zip" in msg and wrong in msg and SHA in msg and "\n" not in msg
    assert not dest.exists() and not (tmp_path / "file.zip.part").exists()


def test_md5_is_checked_too(tmp_path):
    with Server() as server:
        download(server.url, tmp_path / "a.zip", md5=hashlib.md5(PAYLOAD).hexdigest(), progress=False)
        with pytest.raises(DataError, match="md5 mismatch"):
            download(server.url, tmp_path / "b.zip", md5="f" * 32, progress=False)
    assert file_hash(tmp_path / "a.zip") == SHA and not (tmp_path / "b.zip").exists()


def test_unreachable_server_says_what_to_download_and_where(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/images_evaluation.zip"
    dest = tmp_path / "data" / "images_evaluation.zip"
    with pytest.raises(DataError) as err:
        download(url, dest, None, progress=False, timeout=5)
    msg = str(err.value)
    assert url in msg and str(dest) in msg and "--data-root" in msg and "\n" not in msg
    assert not dest.exists()


def test_http_error_is_reported(tmp_path):
    with Server() as server:
        with pytest.raises(DataError, match="HTTP 404"):
            download(server.url.replace("file.zip", "missing.zip"), tmp_path / "m.zip", progress=False)


@pytest.mark.parametrize("url", ["http://example.org/file.zip", "ftp://example.org/file.zip",
                                 "file:///etc/passwd", "http://10.0.0.1/file.zip"])
def test_only_https_is_fetched(tmp_path, url):
    with pytest.raises(DataError, match="only https addresses are fetched"):
        download(url, tmp_path / "file.zip", SHA, progress=False)
    assert not list(tmp_path.iterdir())
