"""helpers.t2i.classifier and evaluate: the attribute classifier, attribute accuracy, caption accuracy against
matching and shuffled captions, the spread across noise, and mean and spread over noise seeds."""
import pytest
import torch
from torch import nn

from helpers.t2i.classifier import attribute_accuracy, train_attribute_classifier
from helpers.t2i.evaluate import caption_accuracy, derangement, mean_and_spread, within_caption_spread
from helpers.t2i.shapes import ATTRIBUTES, all_combinations, make_shapes


def test_derangement_moves_every_index():
    perm = derangement(10, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(10)) and (perm != torch.arange(10)).all()


class FixedClassifier(nn.Module):
    """Predicts colour 0, shape 1, size 0, position 2 for every image."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        n = len(images)
        onehot = {"colour": (4, 0), "shape": (3, 1), "size": (2, 0), "position": (4, 2)}
        return {k: nn.functional.one_hot(torch.full((n,), i), c).float() for k, (c, i) in onehot.items()}


def test_attribute_accuracy_by_hand():
    attrs = torch.tensor([[0, 1, 0, 2],     # all four right
                          [0, 1, 1, 2],     # size wrong
                          [1, 0, 0, 0],     # colour, shape, position wrong
                          [0, 2, 0, 2]])    # shape wrong
    # colour 3/4, shape 2/4, size 3/4, position 3/4, all four 1/4
    scores = attribute_accuracy(FixedClassifier(), torch.zeros(4, 3, 8, 8), attrs)
    assert scores == {"colour": 0.75, "shape": 0.5, "size": 0.75, "position": 0.75, "all": 0.25}
    with pytest.raises(ValueError, match="3 images but 4 attribute rows"):
        attribute_accuracy(FixedClassifier(), torch.zeros(3, 3, 8, 8), attrs)


def test_attribute_classifier_learns_real_shapes(one_thread):
    data = make_shapes(600, all_combinations(), image_size=32, seed=0)
    model = train_attribute_classifier(data, steps=120, batch_size=32)
    held_out = make_shapes(200, all_combinations(), image_size=32, seed=1)
    scores = attribute_accuracy(model, held_out.images, held_out.attributes)
    assert scores["colour"] > 0.9 and scores["position"] > 0.9


def test_within_caption_spread_by_hand():
    black, white = -torch.ones(3, 2, 2), torch.ones(3, 2, 2)
    # pixels in [0, 1]: black 0, white 1; RMS distance black-white = 1, black-black = 0
    assert within_caption_spread(torch.stack([black, white])[None]).tolist() == [1.0]
    # three images 0, 0, 1: ordered pairs (6) have distances 0, 1, 0, 1, 1, 1 -> 4 / 6
    spread = within_caption_spread(torch.stack([black, black, white])[None])
    assert spread.item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="K >= 2"):
        within_caption_spread(black[None, None])


def test_mean_and_spread_by_hand():
    assert mean_and_spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))   # sample std: sqrt(2 / 2)
    assert mean_and_spread([0.5]) == (0.5, 0.0)


class AttributePainter(nn.Module):
    """A stand-in G: writes the four attribute numbers of its 'text' (N, 4) into four pixels of a 4x4 image, or
    those of one fixed row whatever the text says (`ignore_text`); the noise is not used."""

    def __init__(self, ignore_text: torch.Tensor | None = None):
        super().__init__()
        self.z_dim, self.ignore_text, self.dummy = 2, ignore_text, nn.Parameter(torch.zeros(1))

    def forward(self, z, text):
        source = text if self.ignore_text is None else self.ignore_text.expand(len(text), -1)
        images = torch.zeros(len(text), 3, 4, 4)
        images[:, 0, 0, :] = source.float()
        return images


class AttributeReader(nn.Module):
    """A stand-in classifier: reads the four attribute numbers back from the pixels AttributePainter wrote."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        counts = [len(v) for v in ATTRIBUTES.values()]
        return {name: nn.functional.one_hot(images[:, 0, 0, k].round().long(), n).float()
                for k, (name, n) in enumerate(zip(ATTRIBUTES, counts))}


def test_caption_accuracy_tells_a_generator_that_follows_its_text_from_one_that_ignores_it():
    attrs = torch.tensor([[0, 1, 0, 2], [0, 1, 0, 2], [1, 0, 0, 0], [3, 2, 1, 1], [2, 2, 1, 3]])
    text = attrs.float()                                        # the 'embedding' is the attribute numbers
    follows = caption_accuracy(AttributePainter(), AttributeReader(), text, attrs, seeds=(0, 1, 2))
    assert [s["all"] for s in follows["matching"]] == [1.0, 1.0, 1.0]
    # shuffled: another caption's attributes; only where a derangement swaps rows 0 and 1 (equal rows) they agree
    for seed, scores in zip((0, 1, 2), follows["shuffled"]):
        order = derangement(5, torch.Generator().manual_seed(seed))
        assert scores["all"] == pytest.approx((attrs[order] == attrs).all(1).float().mean().item())
        assert scores["all"] <= 0.4
    ignores = caption_accuracy(AttributePainter(attrs[0]), AttributeReader(), text, attrs, seeds=(0, 1, 2))
    # always draws row 0, which two of five captions ask for; a shuffle is a permutation, so the same two of five
    assert [s["all"] for s in ignores["matching"]] == pytest.approx([0.4] * 3, rel=torch.finfo(torch.float32).eps)
    assert [s["all"] for s in ignores["shuffled"]] == [s["all"] for s in ignores["matching"]]
