import pytest
import torch
from torch import nn

from deepcrf.crf.dense import dense_crf
from deepcrf.engine.tune import refine_grid, tune_dense_crf
from deepcrf.metrics import ConfusionMatrix


class _Noisy(nn.Module):
    """Blurry, noisy unaries of the true labels (read from channel 1 of the image)."""

    def forward(self, image):
        labels = (image[:, 1] > 127).long()
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(image.shape[0], 2, *image.shape[2:], generator=gen)
        return torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float() + 1.5 * noise


def _dataset():
    items = []
    for shift in (3, 6):
        labels = torch.zeros(16, 20, dtype=torch.int64)
        labels[4:12, shift : shift + 10] = 1
        image = torch.stack([torch.full((16, 20), 50.0), labels.float() * 200, labels * 0.0 + 30])
        items.append((image, labels))
    return items


def test_grid_search_finds_the_best_point_and_matches_direct_evaluation():
    data = _dataset()
    grid = {"w_bilateral": [1.0, 8.0], "theta_alpha": [5.0], "theta_beta": [10.0],
            "w_spatial": [0.5], "theta_gamma": [1.0]}  # fmt: skip
    out = tune_dense_crf(_Noisy(), data, num_classes=2, grid=grid, iters=3, rounds=1,
                         progress=False)  # fmt: skip
    assert len(out["trials"]) == 2
    assert out["best"]["miou"] == max(t["miou"] for t in out["trials"])
    # Recompute one trial directly: same unaries (log-softmax), same CRF, same metric.
    trial = out["trials"][1]
    cm = ConfusionMatrix(2)
    for image, labels in data:
        unary = _Noisy()(image[None]).log_softmax(1)
        q = dense_crf(unary, image[None], iters=3, **trial["params"])
        cm.update(q.argmax(1)[0], labels)
    assert trial["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-3)
    # A strong bilateral kernel on these colour-coded labels beats the noisy unaries.
    assert out["best"]["miou"] > out["baseline_miou"]
    assert out["best"]["params"]["iters"] == 3


def test_refine_grid_halves_steps_around_best():
    grid = {"a": [50.0, 60.0, 70.0], "b": [3.0], "c": [1.0, 2.0]}
    assert refine_grid(grid, {"a": 70.0, "b": 3.0, "c": 1.0}) == {
        "a": [65.0, 70.0], "b": [3.0], "c": [1.0, 1.5]}  # fmt: skip


def test_second_round_only_adds_new_points():
    grid = {"w_bilateral": [2.0, 4.0], "theta_alpha": [5.0], "theta_beta": [10.0],
            "w_spatial": [1.0], "theta_gamma": [1.0]}  # fmt: skip
    out = tune_dense_crf(_Noisy(), _dataset(), num_classes=2, grid=grid, iters=1, rounds=2,
                         progress=False)  # fmt: skip
    points = [tuple(t["params"].values()) for t in out["trials"]]
    assert len(points) == len(set(points)) == 3
    assert [t["round"] for t in out["trials"]] == [1, 1, 2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown grid parameters"):
        tune_dense_crf(_Noisy(), _dataset(), num_classes=2, grid={"sigma": [1.0]})
    with pytest.raises(ValueError, match="positive"):
        tune_dense_crf(_Noisy(), _dataset(), num_classes=2, grid={"theta_alpha": [0.0]})
    with pytest.raises(ValueError, match="empty"):
        tune_dense_crf(_Noisy(), [], num_classes=2)


def test_threaded_batches_give_the_sequential_counts(monkeypatch):
    """Small images run on one Python thread per kernel thread: the same trials either way."""
    from deepcrf.ops import native

    if native.library() is None:
        pytest.skip(native.status())
    grid = {"w_bilateral": [1.0, 4.0, 8.0], "theta_alpha": [5.0, 9.0], "theta_beta": [10.0],
            "w_spatial": [0.5, 2.0], "theta_gamma": [1.0]}  # fmt: skip
    from deepcrf.engine import tune

    pools = []

    class Pool(tune.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(tune, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(tune, "_CALL_PIXELS", 2 * 16 * 20)  # two images per batch
    data = _dataset() * 3
    runs = {}
    for workers in (1, 2):
        monkeypatch.setattr(native, "threads", lambda w=workers: w)
        out = tune_dense_crf(_Noisy(), data, num_classes=2, grid=grid, iters=3, rounds=1,
                             progress=False)  # fmt: skip
        runs[workers] = [(t["params"], t["miou"], t["pixel_accuracy"]) for t in out["trials"]]
    assert len(pools) == 1  # only the run with two workers used the pool
    assert len(runs[1]) == 12
    assert runs[1] == runs[2]
