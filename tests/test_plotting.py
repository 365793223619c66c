"""helpers.plotting: grids keep values and layout; tables check their size; figures are saved as PNG."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers.plotting import image_grid, show_image_table, show_panels, show_rows, to_display


def test_to_display_maps_minus_one_one_to_unit_range():
    assert to_display(torch.tensor([-1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.5, 1.0, 1.0]


def test_image_grid_shape_for_a_batch_of_gray_images():
    grid = image_grid(torch.zeros(10, 28, 28), nrow=5, padding=2)
    assert grid.shape == (3, 2 * 28 + 3 * 2, 5 * 28 + 6 * 2)  # make_grid repeats gray to 3 channels


def test_image_table_checks_its_size():
    with pytest.raises(ValueError, match="3 images do not fill a 2 x 2 table"):
        show_image_table(torch.rand(3, 3, 8, 8), ["a", "b"], [0, 1], "t")


def test_figures_are_saved_as_png_showing_the_images(tmp_path):
    """The saved PNG shows the panels: with a black image among them the figure holds a large block of black
    pixels (the panel, drawn at many screen pixels per image pixel); with a white one instead, only the thin
    black of text and frames."""
    show_image_table(torch.rand(4, 3, 8, 8), ["a", "b"], [0, 1], "table", tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    black = {}
    for name, value in (("black", 0.0), ("white", 1.0)):
        show_panels({"x": torch.full((3, 8, 8), value), "y": torch.ones(2, 3, 8, 8)}, "panels",
                    tmp_path / f"{name}.png", value_range=(0.0, 1.0))
        black[name] = int((np.asarray(Image.open(tmp_path / f"{name}.png").convert("L")) < 8).sum())
    assert black["black"] > 20_000 and black["white"] < 5_000, black


def test_show_rows_takes_a_mapping_or_pairs_with_repeated_labels(tmp_path):
    fig = show_rows({"input": torch.zeros(3, 3, 8, 8), "output": torch.ones(3, 3, 8, 8)}, "rows", tmp_path / "r.png",
                    xlabel="example")
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["input", "output"]
    fig = show_rows([("same", torch.zeros(2, 3, 8, 8)), ("same", torch.zeros(2, 3, 8, 8))], "pairs")
    assert len(fig.axes) == 2 and (tmp_path / "r.png").stat().st_size > 0
