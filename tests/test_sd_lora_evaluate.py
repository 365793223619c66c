"""Notebook 06's evaluation: images from the pipeline (helpers/sd_lora/evaluate.py), the CLIP score it reports
(helpers/clip.py), and experiments/bench_sd_lora.py (the timed variants, and the T4 estimate derived in
experiments/RESULTS.md, section 06)."""
import math
from pathlib import Path

import pytest
import torch

from helpers import clip
from helpers.sd_lora import evaluate as sd_eval, pipeline as sd_pipeline


EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return sd_pipeline.resolve_model_id(sd_pipeline.TINY_MODEL_ID, tmp_path_factory.mktemp("sd"))


# --- images from the pipeline --------------------------------------------------------------------------------


def test_tiny_pipeline_loads_and_generates(tiny_model):
    pipe = sd_pipeline.load_pipeline(tiny_model)
    images = sd_eval.pipeline_images(pipe, ["a red circle", "a blue square"], [0, 1], steps=2, guidance=7.5, size=32)
    assert images.shape == (4, 3, 32, 32)
    again = sd_eval.pipeline_images(pipe, ["a blue square"], [0], steps=2, guidance=7.5, size=32)
    assert torch.equal(again[0], images[2])                 # prompt-major, and a seed fixes the image
    assert not torch.equal(images[2], images[3])            # another seed, another image


# --- CLIP score ----------------------------------------------------------------------------------------------


def test_clip_score_by_hand():
    # CLIPScore = max(100 * mean cosine, 0): cosines 0.3, -0.2, 0.1 -> 100 * 0.2 / 3 = 6.667 (a per-pair clip at 0
    # would give (30 + 0 + 10) / 3 = 13.33); the embeddings' lengths do not matter
    cosines = torch.tensor([0.3, -0.2, 0.1])
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    texts = torch.stack([2 * cosines[0], 2 * (1 - cosines[0] ** 2).sqrt()])[None]
    texts = torch.cat([texts, torch.stack([(1 - cosines[1] ** 2).sqrt(), cosines[1]])[None] * 5,
                       torch.stack([cosines[2], -(1 - cosines[2] ** 2).sqrt()])[None]])
    assert clip.clip_score_from_embeddings(images, texts) == pytest.approx(100 * 0.2 / 3, rel=1e-6)
    assert clip.clip_score_from_embeddings(images, -texts) == 0.0          # mean cosine -0.067 -> 0


def test_clip_preprocessing_is_clips(tmp_path):
    # CLIP's own preprocessing (transformers' CLIPImageProcessor): shorter side resized to the input size
    # (bicubic, antialiased), centre crop, CLIP's mean and std. A wide image must not be squeezed.
    from transformers import CLIPImageProcessor

    size = 32
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = torch.rand(3, 1, 1).expand(3, 96, 160).clone()
    image[:, 30:66, 40:120] = torch.rand(3, 1, 1)               # a wide rectangle on a background
    image += 0.1 * torch.rand(3, 96, 160)
    image = image.clamp(0, 1)
    uint8 = (image * 255).round().to(torch.uint8)
    reference = processor(images=uint8, return_tensors="pt", do_convert_rgb=False).pixel_values
    ours = clip.clip_pixels(uint8[None].float() / 255, size)
    assert ours.shape == reference.shape == (1, 3, size, size)
    # the processor rounds to 8 bits: up to about 1.5 levels of 255, over CLIP's std (about 0.27)
    assert (ours - reference).abs().max() <= 1.5 / 255 / min(clip.CLIP_STD)


def test_clip_embeddings_are_the_projected_ones(tmp_path):
    # CLIPScore compares the projected embeddings (the shared image-text space), not the encoders' pooled
    # outputs; the stand-in's projections are random 32 x 32 matrices, so the two differ
    model, tokenizer = clip.load_clip(clip.STAND_IN_CLIP_ID, tmp_path, torch.device("cpu"))
    images, captions = torch.rand(2, 3, 40, 40), ["a red circle", "a blue square"]
    image_embeds = clip.clip_image_embeddings(model, images)
    text_embeds = clip.clip_text_embeddings(model, tokenizer, captions)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=clip.clip_pixels(images, 32)).pooler_output
        tokens = tokenizer(captions, padding=True, return_tensors="pt")
        text_pooled = model.text_model(**tokens).pooler_output
        expected = model.visual_projection(pooled), model.text_projection(text_pooled)
    for ours, reference, unprojected in ((image_embeds, expected[0], pooled), (text_embeds, expected[1], text_pooled)):
        scale = reference.abs().max()
        assert (ours - reference).abs().max() <= 64 * EPS32 * scale
        assert (ours - unprojected).abs().max() > 0.1 * scale
    # an image scored against its own direction: cosine 1 -> 100
    assert clip.clip_score_from_embeddings(image_embeds, 3 * image_embeds) == pytest.approx(100, rel=1e-6)


# --- experiments/bench_sd_lora.py: the timed variants and the T4 estimate in the notebook's header -----------


def _bench():
    import bench_sd_lora

    return bench_sd_lora


def test_t4_estimate_comes_from_the_flop_count_and_the_notebook_quotes_its_total():
    """RESULTS.md section 06 holds the derivation; the notebook's run-time line quotes only its total, each end
    rounded up to 5 minutes (the downloads are not timed, and the line says so)."""
    bench = _bench()
    flops = bench.full_mode_tflop()
    # SD 1.5 UNet: 0.80 TFLOP forward per 512 px image; the step is 2 x (UNet forward + LoRA backward on 2 images,
    # VAE encoding of 2 images, text encoder)
    assert round(flops["train_step_unet"], 2) == 6.86 and round(flops["train_step"], 1) == 11.4
    estimate = bench.t4_estimate(flops)
    steps = tuple(round(s, 1) for s in estimate["train_step"])
    training = tuple(round(s / 60) for s in estimate["training"])
    rest = tuple(round(s / 60) for s in estimate["rest"])
    assert (steps, training, rest) == ((5.3, 7.7), (26, 38), (16, 23))
    root = Path(__file__).resolve().parent.parent
    results = (root / "experiments/RESULTS.md").read_text()
    section = " ".join(results.split("## 06 ")[1].split("\n## ")[0].split())
    total = [5 * math.ceil((t + r) / 60 / 5) for t, r in zip(estimate["training"], estimate["rest"])]
    quoted = ("5.3–7.7 s per step", "26–38 min for 300 steps", "16–23 min", "11.4 TFLOP per step",
              f"{total[0]}–{total[1]} min")
    for text in quoted:
        assert text in section, text
    source = (root / "notebooks/06_stable_diffusion_lora.py").read_text().split("# %% SETUP")[0]
    run_time = next(line for line in source.splitlines() if line.startswith("# ⏱"))
    assert f"about {total[0]}–{total[1]} min (estimated), plus the downloads" in run_time, run_time


def test_bench_rows_on_cpu():
    rows = _bench().run(torch.device("cpu"), reduced=True)
    assert [r["baseline"] for r in rows] == [True, False, False, False]
    timed, unavailable = rows[:2], rows[2:]
    assert all(r["ms_per_step"] > 0 and r["peak_memory_mb"] is None for r in timed)  # CPU: no GPU memory
    assert all(r["ms_per_step"] is None and r["note"].startswith("unavailable: QLoRA needs") for r in unavailable)
