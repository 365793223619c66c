"""Execute a notebook headless in this Python environment and save the executed copy (used by tools/run.sh)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(src: str, dst: str) -> None:
    """Run every cell of `src` with its folder as working directory; write the result to `dst`."""
    nb = nbformat.read(src, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(Path(src).parent)}}).execute()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    print(f"{src}: executed in {time.perf_counter() - start:.1f} s -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
