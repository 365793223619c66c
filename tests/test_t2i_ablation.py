"""experiments/ablate_t2i.py: each variant is built from helpers.t2i and trained by its loop; the improved row is
the notebook's improved recipe on the shapes set."""
import ast
import re
from pathlib import Path

import pytest
import torch

import ablate_t2i as ablation
from helpers.t2i.shapes import all_combinations, make_shapes
from helpers.t2i.train import TextToImageRecipe

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_text_to_image_dcgan.py"


def notebook_recipes(dataset: str) -> dict:
    """The RECIPES of notebook 04's parameters cell (from `RECIPES = {` to its closing line), for `dataset`."""
    found = re.search(r"^RECIPES = (\{.*?^\})", NOTEBOOK.read_text(), re.M | re.S)
    assert found, "notebook 04 defines no RECIPES"
    return eval(compile(ast.parse(found[1], mode="eval"), str(NOTEBOOK), "eval"), {"DATASET": dataset})


def test_the_improved_variant_is_the_notebooks_improved_recipe():
    options, weights = ablation.VARIANTS["improved (+ packing 2)"]
    notebook = notebook_recipes("shapes")
    assert options == notebook["improved"]["model"] and weights == notebook["improved"]["loss"]
    assert ablation.VARIANTS["paper"] == (notebook["paper"]["model"], notebook["paper"]["loss"])


@pytest.fixture
def small_shapes():
    data = make_shapes(12, all_combinations()[:3], ablation.SIZE, seed=0)   # 4 images per combination
    generator = torch.Generator().manual_seed(0)
    return data, {caption: torch.randn(384, generator=generator) for caption in data.captions}


def test_variants_train_through_the_notebook_loop_with_their_switches(tmp_path, monkeypatch, one_thread,
                                                                      small_shapes):
    data, table = small_shapes
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    monkeypatch.setattr(ablation, "BATCH", 8)
    seen, loop = {}, ablation.train_text_to_image

    def recording_loop(state, batch_at, recipe, *args):
        seen.update(recipe=recipe, batch=batch_at(1), D=state["D"])
        return loop(state, batch_at, recipe, *args)

    monkeypatch.setattr(ablation, "train_text_to_image", recording_loop)
    G, _, parameters = ablation.train_variant("improved (+ packing 2)", data, table, 2, 0, cap=0.3)
    images, right, wrong, labels = seen["batch"]
    # 8 real images as 4 packs of 2 images of one caption (6 channels), the 4 attributes as labels
    assert images.shape == (4, 6, 32, 32) and labels.shape == (4, 4) and right.shape == wrong.shape == (4, 384)
    assert G.conditional_bn and seen["D"].pack == 2 and len(seen["D"].class_heads) == 4
    saved = torch.load(tmp_path / "runs" / "t2i_ablation" / "improved_(+_packing_2).pt", weights_only=False)
    assert saved["state"]["run"]["step"] == 2 and saved["config"] == {"variant": "improved (+ packing 2)"}
    # the capped mode-seeking variant gets the cap measured on real images in place of "real", and no packing
    ablation.train_variant("mode seeking (capped) instead of packing", data, table, 1, 0, cap=0.3)
    assert seen["recipe"] == TextToImageRecipe(gan_int=0.0, auxiliary=1.0, mode_seeking=1.0, mode_seeking_cap=0.3)
    assert seen["batch"][0].shape == (8, 3, 32, 32) and seen["D"].pack == 1
