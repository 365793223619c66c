"""House rules every notebook keeps (GUIDE.md): stored without outputs, the same setup cell, a badge, metrics.json."""
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SETUP_CELL = (ROOT / "tools" / "setup_cell.py").read_text().strip()


def code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_the_collection_has_its_first_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    assert "01_mnist_gan" in names and "02_fashion_mnist_gan" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_shared_setup_cell(path):
    assert code_cells(path)[0].strip() == SETUP_CELL, f"{path.name}: rebuild it with tools/notebook.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_title_has_a_colab_badge_for_this_notebook(path):
    first = nbformat.read(path, as_version=4).cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert f"/notebooks/{path.name})" in first.source and "colab-badge.svg" in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_checks_are_asserts_and_a_metrics_file_is_written(path):
    source = "\n".join(code_cells(path))
    assert "assert " in source, "with outputs stripped, nbval only sees exceptions: checks must be asserts"
    assert "write_metrics(" in source and "smoke_mode()" in source


def test_gan_notebooks_share_all_code_but_the_dataset():
    mnist, fashion = (code_cells(ROOT / "notebooks" / f"{n}.ipynb") for n in ("01_mnist_gan", "02_fashion_mnist_gan"))
    assert len(mnist) == len(fashion)
    differing = [(a, b) for a, b in zip("\n".join(mnist).splitlines(), "\n".join(fashion).splitlines()) if a != b]
    assert [a.split("=")[0].strip() for a, _ in differing] == ["NOTEBOOK", "DATASET"], differing
