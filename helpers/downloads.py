"""Downloads: every fetch over the internet goes through here, with a timeout, a User-Agent that names the
project and its address (Wikimedia, among others, refuses anonymous clients), and an error that says what to
do. `fetch_first` tries a list of public sources in turn."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

PROJECT_URL = "https://github.com/genimg-notebooks/genimg-notebooks"
USER_AGENT = f"genimg-notebooks/1.0 (+{PROJECT_URL}; course notebooks) Python-urllib"
TIMEOUT_S = 60  # seconds without a byte before a download counts as stalled


class DownloadError(ConnectionError):
    """No source of a file could be downloaded; the message lists each source and what to do."""


def open_url(url: str, timeout: float = TIMEOUT_S):
    """urlopen with the project's User-Agent and a timeout (a stalled server raises instead of hanging)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)


def fetch_bytes(url: str, role: str = "file", timeout: float = TIMEOUT_S) -> bytes:
    """The body of `url`; a failure says which input it was and what to do."""
    try:
        with open_url(url, timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DownloadError(
            f"{role} '{url}' could not be downloaded within {timeout:g} s ({getattr(err, 'reason', err)}); check the "
            "address and the runtime's internet connection, or download the file yourself and pass its path"
        ) from err


def fetch_file(url: str, target: str | os.PathLike, role: str = "file", timeout: float = TIMEOUT_S) -> Path:
    """Download `url` into `target` (through a .part file, so an interrupted download leaves no half file)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with open_url(url, timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{role} '{url}' could not be downloaded within {timeout:g} s ({getattr(err, 'reason', err)}); check the "
            f"runtime's internet connection, or download it yourself to '{target}'"
        ) from err
    os.replace(part, target)
    return target


def fetch_first(urls: Sequence[str], target: str | os.PathLike, role: str = "file",
                timeout: float = TIMEOUT_S) -> Path:
    """Download the first of `urls` that answers into `target`, printing each source that failed; raises
    DownloadError listing every source when none does."""
    if not urls:
        raise ValueError(f"{role}: no source to download from")
    failures = []
    for url in urls:
        try:
            return fetch_file(url, target, role, timeout)
        except DownloadError as err:
            failures.append(f"  {url}: {err.__cause__ or err}")
            if url != urls[-1]:
                print(f"{role}: '{url}' failed ({err.__cause__ or err}); trying the next source")
    raise DownloadError(f"{role} could not be downloaded from any of its {len(urls)} sources:\n"
                        + "\n".join(failures)
                        + f"\nCheck the runtime's internet connection, or download it yourself to '{target}'")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in pieces (a 548 MB weights file is never in memory whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def cache_torchvision_weights(weights, role: str, timeout: float = TIMEOUT_S) -> Path:
    """Download torchvision's `weights` (e.g. VGG19_Weights.IMAGENET1K_V1) through helpers.downloads into the
    folder where torchvision looks for them (torch.hub's checkpoints), unless they are there; torchvision then
    loads that file. The file name carries the first hex digits of its SHA-256, which is checked after a download."""
    import torch  # only here: the rest of this module needs no torch

    name = Path(urllib.parse.urlsplit(weights.url).path).name
    target = Path(torch.hub.get_dir()) / "checkpoints" / name
    if target.is_file():
        return target
    fetch_first([weights.url], target, role, timeout)
    expected = name.rsplit("-", 1)[-1].split(".")[0]
    digest = file_digest(target)
    if not digest.startswith(expected):
        target.unlink()
        raise DownloadError(f"{role}: the file from '{weights.url}' is damaged (SHA-256 {digest[:8]}..., expected "
                            f"{expected}...); run the cell again, or download it yourself to '{target}'")
    return target


@contextmanager
def socket_timeout(seconds: float = TIMEOUT_S) -> Iterator[None]:
    """For a library that downloads with no timeout of its own (torchvision's datasets): inside this block a
    connection that stalls for `seconds` raises instead of hanging Run all for ever."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
