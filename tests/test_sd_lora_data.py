"""helpers/sd_lora/data.py (notebook 06): captioned images of any size and mode, captions from text files or
metadata.jsonl or a Hub dataset, the errors that name uncaptioned images, the seeded batch order."""
import json

import pytest
import torch
from PIL import Image

from helpers.sd_lora import data as sd_data


EPS32 = torch.finfo(torch.float32).eps


def test_mixed_sizes_are_resized_and_cropped(tmp_path):
    folder = sd_data.make_shape_images(tmp_path, count=4)
    assert len({Image.open(p).size for p in folder.glob("*.png")}) == 4
    Image.new("L", (50, 30), 128).save(folder / "grey.png")       # greyscale, wide
    Image.new("RGBA", (20, 90), (0, 0, 0, 0)).save(folder / "tall.png")
    (folder / "grey.txt").write_text("a grey image")
    (folder / "tall.txt").write_text("a tall image")
    dataset = sd_data.CaptionedImages.from_folder(folder, resolution=32)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        assert dataset[i]["pixel_values"].shape == (3, 32, 32)
    items = dict(zip([p.name for p in dataset.images], (dataset[i] for i in range(len(dataset)))))
    assert items["grey.png"]["caption"] == "a grey image"
    # greyscale 128 -> the same value in all three channels, 128 / 127.5 - 1; transparent black -> black, -1
    grey = items["grey.png"]["pixel_values"] - (128 / 127.5 - 1)
    assert grey.abs().max() <= 8 * EPS32                    # resampling a constant: rounding on values near 1
    assert torch.equal(items["tall.png"]["pixel_values"], torch.full((3, 32, 32), -1.0))


def test_metadata_jsonl_captions(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "black square"}) + "\n")
    assert sd_data.CaptionedImages.from_folder(tmp_path, 16).captions == ["black square"]


def test_images_without_captions_are_named(tmp_path):
    folder = sd_data.make_shape_images(tmp_path, count=3)
    (folder / "shape_01.txt").unlink()
    (folder / "shape_02.txt").write_text("   \n")
    with pytest.raises(sd_data.MissingCaptionError, match=r"2 of 3 images .* no caption: shape_01.png, shape_02.png"):
        sd_data.CaptionedImages.from_folder(folder, 32)
    with pytest.raises(sd_data.MissingCaptionError, match="row 1"):
        sd_data.CaptionedImages([Image.new("RGB", (8, 8))] * 2, ["ok", None], 8)


def test_hub_style_dataset_through_datasets(tmp_path):
    pytest.importorskip("datasets")                          # Colab has it; CI does not install it
    Image.new("RGB", (48, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 48)).save(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "text": "wide"}, {"file_name": "b.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(sd_data.MissingCaptionError, match="1 of 2 images in dataset .* no caption: row 1"):
        sd_data.CaptionedImages.from_hub(str(tmp_path), 16)
    rows[1]["text"] = "tall"
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = sd_data.CaptionedImages.from_hub(str(tmp_path), 16)
    assert dataset.captions == ["wide", "tall"] and dataset[1]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(KeyError, match="has no column 'caption'"):
        sd_data.CaptionedImages.from_hub(str(tmp_path), 16, caption_column="caption")


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        sd_data.CaptionedImages.from_folder(tmp_path, 32)
    with pytest.raises(FileNotFoundError, match="image folder '.*nowhere' not found"):
        sd_data.CaptionedImages.from_folder(tmp_path / "nowhere", 32)


def test_batches_cover_each_epoch_and_repeat_exactly():
    first_epoch = [i for step in range(5) for i in sd_data.batch_indices(step, 2, 10, seed=0)]
    assert sorted(first_epoch) == list(range(10))
    assert sd_data.batch_indices(7, 2, 10, seed=0) == sd_data.batch_indices(7, 2, 10, seed=0)
    assert sd_data.batch_indices(5, 2, 10, seed=0) != sd_data.batch_indices(0, 2, 10, seed=0)
