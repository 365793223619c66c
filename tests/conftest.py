import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU run far faster on one torch thread than on two fighting for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_setup_cell(tmp_path, monkeypatch):
    """Run a notebook's setup cell as a fresh Colab runtime would: in an empty folder, with no `helpers` imported
    yet. Returns a function source -> the cell's namespace; afterwards this process's own `helpers` comes back."""
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # monkeypatch restores the import path afterwards
    saved = {k: v for k, v in sys.modules.items() if k == "helpers" or k.startswith("helpers.")}
    for key in saved:
        del sys.modules[key]

    def run(source: str) -> dict:
        namespace: dict = {}
        exec(compile(source, "setup", "exec"), namespace)
        return namespace

    yield run
    for key in [k for k in sys.modules if k == "helpers" or k.startswith("helpers.")]:
        del sys.modules[key]
    sys.modules.update(saved)


@pytest.fixture
def serve_http():
    """Start a local HTTP server for a request handler class: a function handler -> its base URL. The servers
    stop after the test."""
    import http.server
    import threading

    servers = []

    def start(handler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
