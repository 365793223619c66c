"""Build a notebook from a percent-format source, or extract one back (the notebooks are the committed product).

    python tools/notebook.py build SRC.py notebooks/NAME.ipynb    # cells split at '# %%' / '# %% [markdown]'
    python tools/notebook.py extract notebooks/NAME.ipynb SRC.py  # the reverse, for editing in a text editor

The line `# %% SETUP` is replaced by the canonical setup cell (tools/setup_cell.py). Outputs are never stored.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

SETUP_CELL = (Path(__file__).parent / "setup_cell.py").read_text().rstrip("\n")
MARKDOWN, CODE, SETUP = "# %% [markdown]", "# %%", "# %% SETUP"


def _flush(cells: list, kind: str | None, lines: list[str]) -> None:
    text = "\n".join(lines).strip("\n")
    if kind == "markdown":
        text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
        cells.append(nbformat.v4.new_markdown_cell(text))
    elif kind == "code" and text:
        cells.append(nbformat.v4.new_code_cell(text))


def build(src: Path, dst: Path) -> None:
    """Percent-format source -> notebook without outputs."""
    cells: list = []
    kind, lines = None, []
    for line in src.read_text().splitlines():
        if line.strip() == SETUP:
            _flush(cells, kind, lines)
            cells.append(nbformat.v4.new_code_cell(SETUP_CELL))
            kind, lines = None, []
        elif line.startswith(MARKDOWN):
            _flush(cells, kind, lines)
            kind, lines = "markdown", []
        elif line.startswith(CODE):
            _flush(cells, kind, lines)
            kind, lines = "code", []
        else:
            lines.append(line)
    _flush(cells, kind, lines)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}, "accelerator": "GPU", "colab": {"provenance": []}}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
    nbformat.validate(nb)
    dst.write_text(nbformat.writes(nb) + "\n")


def extract(src: Path, dst: Path) -> None:
    """Notebook -> percent-format source (the setup cell becomes '# %% SETUP')."""
    nb = nbformat.read(src, as_version=4)
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(MARKDOWN + "\n" + "\n".join(f"# {l}" if l else "#" for l in cell.source.splitlines()))
        elif cell.source.strip() == SETUP_CELL.strip():
            parts.append(SETUP)
        else:
            parts.append(CODE + "\n" + cell.source)
    dst.write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("build", "extract"):
        sys.exit(__doc__)
    {"build": build, "extract": extract}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
