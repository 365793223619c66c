"""Notebook 04's recipe ablation on the shapes set: each variant trained for the same iterations, scored like the
notebook (caption accuracy on seen and unseen combinations with the shuffled control, spread across noise), means
and standard deviations over three noise seeds.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/ablate_t2i.py                  # every variant, 6,000 iterations
    OMP_NUM_THREADS=1 .venv/bin/python experiments/ablate_t2i.py paper "improved (+ packing 2)" --iterations 1000

Needs the MiniLM text encoder offline ($T2I_TEXT_ENCODER, as the notebook) or online. Appends one record per
variant to runs/t2i_ablation.json (or --out) and prints a markdown table of all its records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from helpers.t2i.classifier import train_attribute_classifier
from helpers.t2i.data import MEAN_Z_DISTANCE, same_caption_pixel_distance, sample_batch
from helpers.t2i.evaluate import (caption_accuracy, images_per_caption, mean_and_spread, seeded_noise,
                                  within_caption_spread)
from helpers.t2i.model import Discriminator, Generator
from helpers.t2i.shapes import (TEMPLATES, all_combinations, describe, make_shapes, real_images_per_combination,
                                split_combinations)
from helpers.t2i.text import DEFAULT_ENCODER, LOCAL_ENCODER_ENV, TextEncoder
from helpers.t2i.train import TextToImageRecipe, TextToImageSchedule, train_text_to_image
from helpers.training import History, TrainingRun, count_parameters

ROOT = Path(__file__).resolve().parent.parent

# name -> (model options, loss weights): "paper" is Reed et al.'s recipe, "improved" the notebook's; the rows
# between add one change at a time; the last rows swap one part of the improved recipe
IMPROVED_MODEL = {"conditional_bn": True, "projection": True, "auxiliary": True, "pack": 2}
VARIANTS = {
    "paper": ({}, {"gan_int": 1.0}),
    "paper without GAN-INT": ({}, {"gan_int": 0.0}),
    "+ conditional BN": ({"conditional_bn": True}, {"gan_int": 0.0}),
    "+ projection": ({"conditional_bn": True, "projection": True}, {"gan_int": 0.0}),
    "+ auxiliary classifier": ({"conditional_bn": True, "projection": True, "auxiliary": True},
                               {"gan_int": 0.0, "auxiliary": 1.0}),
    "improved (+ packing 2)": (IMPROVED_MODEL, {"gan_int": 0.0, "auxiliary": 1.0}),
    "improved with GAN-INT": (IMPROVED_MODEL, {"gan_int": 1.0, "auxiliary": 1.0}),
    "mode seeking (capped) instead of packing": (
        {"conditional_bn": True, "projection": True, "auxiliary": True},
        {"gan_int": 0.0, "auxiliary": 1.0, "mode_seeking": 1.0, "mode_seeking_cap": "real"}),
}
SEEDS = (10, 11, 12)
SIZE, WIDTH, BATCH = 32, 16, 64


def shapes_and_embeddings(seed: int) -> tuple:
    """The notebook's shapes set (CPU run), the split, and a caption -> embedding table of all captions."""
    train_combos, test_combos = split_combinations(0.2, seed=seed)
    data = make_shapes(4000, train_combos, SIZE, seed=seed)
    encoder = TextEncoder(DEFAULT_ENCODER, os.environ.get(LOCAL_ENCODER_ENV))
    captions = [describe(c, k) for c in all_combinations() for k in range(len(TEMPLATES))]
    table = dict(zip(captions, encoder.encode(captions)))
    return data, train_combos, test_combos, table


def train_variant(name: str, data, table: dict, iterations: int, seed: int, cap: float) -> tuple:
    """Train one variant with the notebook's loop; return G and its training speed (it/s)."""
    options, weights = VARIANTS[name]
    weights = {k: (cap if v == "real" else v) for k, v in weights.items()}
    torch.manual_seed(seed)
    G = Generator(384, 100, 128, WIDTH, SIZE, conditional_bn=options.get("conditional_bn", False))
    pack = options.get("pack", 1)
    D = Discriminator(384, 128, WIDTH, SIZE, projection=options.get("projection", False),
                      n_classes=data.class_counts if options.get("auxiliary") else (), pack=pack)
    state = {"G": G, "D": D, "opt_g": torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
             "opt_d": torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999)),
             "scaler": torch.amp.GradScaler("cpu", enabled=False), "run": TrainingRun(History())}
    embeddings = torch.stack([table[c] for c in data.captions])

    def batch_at(step: int) -> tuple:
        rng = torch.Generator().manual_seed(step)
        images, right, wrong, labels = sample_batch(data, BATCH // pack, rng, pack)
        return images, embeddings[right], embeddings[wrong], labels

    checkpoint = ROOT / "runs" / "t2i_ablation" / f"{name.replace(' ', '_')}.pt"
    checkpoint.unlink(missing_ok=True)
    schedule = TextToImageSchedule(iterations, snapshot_every=iterations, checkpoint_every=iterations)
    fixed = (seeded_noise(2, 100, 0), embeddings[:2])
    run = train_text_to_image(state, batch_at, TextToImageRecipe(**weights), schedule, checkpoint,
                              {"variant": name}, fixed)
    return G, run.stopwatch.throughput()["it_per_s"], count_parameters(G) + count_parameters(D)


def score(G, classifier, table: dict, train_combos, test_combos) -> dict:
    """Caption accuracy (all four attributes) on seen/unseen combinations, shuffled control, and spread."""
    out = {}
    for split, combos in (("seen", train_combos), ("unseen", test_combos)):
        data = make_shapes(500, combos, SIZE, seed=2)
        pick = torch.randint(len(TEMPLATES), (500,), generator=torch.Generator().manual_seed(0))
        text = torch.stack([table[data.captions[ids[k]]] for ids, k in zip(data.caption_ids, pick.tolist())])
        scores = caption_accuracy(G, classifier, text, data.attributes, SEEDS)
        for kind, per_seed in scores.items():
            out[f"{split} {kind}"] = mean_and_spread([s["all"] for s in per_seed])
            out[f"{split} {kind} shape"] = mean_and_spread([s["shape"] for s in per_seed])
    pick = torch.randperm(len(train_combos), generator=torch.Generator().manual_seed(0))[:16].tolist()
    combos = [train_combos[i] for i in pick]
    real = real_images_per_combination(combos, 8, SIZE, seed=5)
    text = torch.stack([table[describe(c)] for c in combos])
    spreads = [within_caption_spread(images_per_caption(G, text, 8, s)).mean().item() for s in SEEDS]
    out["spread"] = mean_and_spread(spreads)
    out["spread real"] = (within_caption_spread(real).mean().item(), 0.0)
    return out


def markdown(records: list[dict]) -> str:
    """A table: one row per record."""
    lines = ["| variant | iterations | it/s (load) | seen: all four | shape | unseen: all four | shuffled "
             "(seen) | spread across noise (real) |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["scores"]
        f = lambda k: f"{100 * s[k][0]:.1f} ± {100 * s[k][1]:.1f} %"  # noqa: E731
        lines.append(f"| {r['variant']} | {r['iterations']:,} | {r['it_per_s']:.1f} ({r['load']:.1f}) | "
                     f"{f('seen matching')} | {f('seen matching shape')} | {f('unseen matching')} | "
                     f"{f('seen shuffled')} | {s['spread'][0]:.3f} ± {s['spread'][1]:.3f} "
                     f"({s['spread real'][0]:.3f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train and score the variants named on the command line (default: all)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "t2i_ablation.json")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data, train_combos, test_combos, table = shapes_and_embeddings(args.seed)
    classifier_data = make_shapes(3000, all_combinations(), SIZE, seed=args.seed + 1)
    classifier = train_attribute_classifier(classifier_data, 1000, seed=args.seed)
    cap = same_caption_pixel_distance(data, 256, torch.Generator().manual_seed(args.seed)) / MEAN_Z_DISTANCE
    out = args.out
    records = json.loads(out.read_text()) if out.exists() else []
    for name in args.variants:
        start = time.perf_counter()
        G, speed, n_params = train_variant(name, data, table, args.iterations, args.seed, cap)
        records.append({"variant": name, "iterations": args.iterations, "it_per_s": speed,
                        "load": os.getloadavg()[0], "seconds": time.perf_counter() - start, "parameters": n_params,
                        "scores": score(G, classifier, table, train_combos, test_combos)})
        out.write_text(json.dumps(records, indent=1) + "\n")
        print(markdown(records[-1:]), flush=True)
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
