"""Download a data file once, resumably, and check it.

``download(url, dest, sha256)`` writes to ``dest + ".part"`` and renames it to ``dest`` only after
the whole file has arrived and its hash matched, so ``dest`` is never a partial or corrupt file. An
interrupted download keeps its ``.part`` file and the next call asks the server for the rest with an
HTTP Range request; a server that ignores Range sends the whole file again and the download restarts
cleanly from byte 0. Only urllib is used.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from metaphi.tasks.base import DataError

CHUNK = 1 << 16
#: plain http is allowed from these hosts only (a mirror on this machine; nothing crosses a network)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, name: str, sha256: str | None, md5: str | None) -> None:
    """Raise DataError naming ``name`` and both hashes when ``path`` does not match."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            actual = file_hash(path, algorithm)
            if actual.lower() != expected.lower():
                raise DataError(f"{name}: {algorithm} mismatch, expected {expected}, got {actual}")


def verify(path: str | os.PathLike, sha256: str | None, md5: str | None = None) -> Path:
    """``path`` when it matches its published hashes (SHA-256, and MD5 where that is all that was
    published); a DataError saying what to do when it does not. For archives found already on disk,
    which are checked before each use as a download is."""
    path = Path(path)
    try:
        _check(path, str(path), sha256, md5)
    except DataError as e:
        raise DataError(f"{e}; the file is corrupt, altered or a different version: delete it and download it "
                        "again (or unpack your own copy and point --data-root at the folder)") from None
    return path


def _unreachable(url: str, dest: Path, reason: object) -> DataError:
    return DataError(
        f"could not download {dest.name} from {url} ({reason}); download it by hand from {url} and put it at "
        f"{dest} (or put it in a folder of your own and pass --data-root DIR)"
    )


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True, *,
             md5: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` unless ``dest`` already exists; return ``dest``. Only https addresses
    are fetched (plain http from the loopback address alone).

    The file is checked against ``sha256`` (and ``md5``) where given. A file already at ``dest`` is
    checked too; a mismatch there raises DataError and leaves the file alone, since it is not ours to
    delete. A download that does not match is removed and raises DataError with both hashes.
    Unreachable servers raise DataError saying where to get the file and where to put it.
    """
    address = urllib.parse.urlsplit(url)
    if address.scheme != "https" and not (address.scheme == "http" and address.hostname in LOOPBACK):
        raise DataError(f"refusing to download {url}: only https addresses are fetched (plain http only from this "
                        "machine's own loopback address, e.g. a local mirror)")
    dest = Path(dest)
    if dest.exists():
        return verify(dest, sha256, md5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _fetch(url, dest, part, progress, timeout)
    except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        raise _unreachable(url, dest, reason) from None
    try:
        _check(part, f"{dest.name} downloaded from {url}", sha256, md5)
    except DataError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _fetch(url: str, dest: Path, part: Path, progress: bool, timeout: float) -> None:
    """Download into ``part``, resuming from its current size when the server honours Range."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "metaphi"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:  # 416: the part is not a prefix the server can extend
            raise
        part.unlink()
        return _fetch(url, dest, part, progress, timeout)
    with response:
        status = getattr(response, "status", 200)
        if start and status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                raise DataError(f"{url}: the server answered a resume from byte {start} with "
                                f"Content-Range {response.headers.get('Content-Range')!r}; delete {part} and run again")
            mode = "ab"
        else:  # 200: the whole file, whether or not a range was asked for
            start, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        from tqdm import tqdm  # lazy

        received = start
        broken = None
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
            try:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                broken = f"{type(e).__name__}: {e}"
    if broken is None and total is not None and received < total:
        broken = "the connection closed early"
    if broken is not None:
        of = f" of {total}" if total is not None else ""
        raise DataError(f"{dest.name}: the download from {url} stopped at {received}{of} bytes ({broken}); "
                        f"run again to resume from {part}")
