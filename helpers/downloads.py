"""Downloads: every fetch over the internet goes through here, with a timeout, a User-Agent that names the
project and its address (Wikimedia, among others, refuses anonymous clients), and an error that says what to
do. `fetch_first` tries a list of public sources in turn; Google Drive's shared files and archives are handled here
too."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager
from html.parser import HTMLParser
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


# --- Google Drive and archives -------------------------------------------------------------------------------


def drive_download_urls(file_id: str, resource_key: str) -> list[str]:
    """Where Google Drive serves a shared file with a resource key: drive.usercontent.google.com, then the older
    drive.google.com/uc endpoint (confirm=t skips the can't-scan-for-viruses page where Drive allows it)."""
    query = urllib.parse.urlencode({"id": file_id, "export": "download", "resourcekey": resource_key, "confirm": "t"})
    return [f"https://drive.usercontent.google.com/download?{query}", f"https://drive.google.com/uc?{query}"]


class _DriveConfirmation(HTMLParser):
    """Reads Drive's 'download anyway' page: the download form's action and hidden fields, or the link."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.link: str | None = None
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and a.get("id") == "download-form":
            self.action, self._in_form = a.get("action"), True
        elif tag == "input" and self._in_form and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("id") == "uc-download-link":
            self.link = a.get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def drive_confirmation_url(page: str, page_url: str) -> str | None:
    """The URL behind the 'download anyway' button of a Drive warning page (None if the page has none); the
    resource key of `page_url` is carried over when the form lacks it."""
    parser = _DriveConfirmation()
    parser.feed(page)
    asked = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page_url).query))
    if parser.action:
        fields = {**({"resourcekey": asked["resourcekey"]} if "resourcekey" in asked else {}), **parser.fields}
        return urllib.parse.urljoin(page_url, parser.action) + "?" + urllib.parse.urlencode(fields)
    return urllib.parse.urljoin(page_url, parser.link) if parser.link else None


def download_drive_file(url: str, path: Path, timeout: float = TIMEOUT_S) -> Path:
    """Stream `url` to `path` (the project's User-Agent and timeout, helpers.downloads.open_url), following one
    Drive 'download anyway' page; a ValueError if HTML comes instead."""
    for _ in range(2):
        with open_url(url, timeout) as response:
            if not response.headers.get_content_type().startswith("text/html"):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                return path
            page = response.read().decode("utf-8", errors="replace")
        next_url = drive_confirmation_url(page, url)
        if next_url is None:
            break
        url = next_url
    raise ValueError(f"{url} answered with a web page, not the file (Drive quota, login or a changed page)")


def unpack_archive(archive: str | os.PathLike, target: str | os.PathLike, what_to_do: str = "") -> None:
    """Unpack a .tar(.gz) or .zip archive into `target` (tar members that would escape it are refused); a
    ValueError that ends with `what_to_do` when the file is neither."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    else:
        raise ValueError(f"'{archive}' is neither a tar nor a zip archive" + (f"; {what_to_do}" if what_to_do else ""))
