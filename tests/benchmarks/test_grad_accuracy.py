"""The lattice's gradients against the exact Gaussian model's, on the issue's structured case."""

import argparse

import pytest
import torch

from . import load_script


def _load():
    return load_script("grad_accuracy")


def assert_gradients_close_to_exact(size, settings):
    ga = _load()
    logits, image, labels = ga.scene(4, size, 3)
    for ta, tb in settings:
        lat = ga.gradients("lattice", logits, image, labels, ta, tb, torch.float32)
        ex = ga.gradients("exact", logits, image, labels, ta, tb, torch.float64)
        cos = torch.nn.functional.cosine_similarity(
            lat["compat"].flatten(), ex["compat"].flatten(), dim=0
        )
        assert float(cos) >= 0.99, (ta, tb, float(cos))
        for name in lat:
            if name == "compat":
                continue
            ratio = float(lat[name] / ex[name])
            assert 0.5 <= ratio <= 2.0, (ta, tb, name, ratio)  # same sign, within 2x


def test_lattice_gradients_learnable_quick():
    assert_gradients_close_to_exact(24, [(20.0, 13.0)])


@pytest.mark.slow
def test_lattice_gradients_learnable_64x64_three_bandwidths():
    # 4 images 64×64, colour blocks + noise σ = 3, (θα, θβ) ∈ {(20, 13), (40, 30), (80, 13)}
    assert_gradients_close_to_exact(64, [(20.0, 13.0), (40.0, 30.0), (80.0, 13.0)])


@pytest.mark.slow
def test_learning_reaches_the_grid_search_on_held_out_images():
    # benchmarks/learn_vs_grid.py at its defaults: 24 + 24 scenes 64×64, 60 Adam steps
    module = load_script("learn_vs_grid")
    args = argparse.Namespace(images=24, size=64, steps=60, iters=5)
    out = module.experiment(args)
    assert out["grid"] >= out["defaults"] + 5.0  # the defaults are clearly not the best
    assert out["learned"] >= out["grid"] - 0.5
