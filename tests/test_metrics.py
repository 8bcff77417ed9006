import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepcrf.metrics import (
    ConfusionMatrix,
    TrimapAccuracy,
    boundary_band,
    confusion_matrix,
    scores_from_confusion,
    trimap_accuracy,
)


def _random_case(b=3, h=9, w=11, num_classes=5, seed=0, ignore_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    pred = torch.where(
        torch.rand(b, h, w, generator=g) < 0.6,
        target.clamp(max=num_classes - 1),
        torch.randint(0, num_classes, (b, h, w), generator=g),
    )
    return pred, target


def _naive_scores(preds, targets, num_classes):
    """Per-image Python loops over pixels: intersections/unions summed over images."""
    inter = [0] * num_classes
    union = [0] * num_classes
    gt_count = [0] * num_classes
    correct = total = 0
    for pred, target in zip(preds, targets, strict=True):
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
            if t == 255:
                continue
            total += 1
            gt_count[t] += 1
            if p == t:
                correct += 1
                inter[t] += 1
                union[t] += 1
            else:
                union[t] += 1
                union[p] += 1
    ious = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    present = [v for v in ious if v is not None]
    accs = [inter[c] / gt_count[c] for c in range(num_classes) if gt_count[c]]
    return {
        "miou": sum(present) / len(present),
        "pixel_accuracy": correct / total,
        "mean_accuracy": sum(accs) / len(accs),
        "per_class_iou": ious,
    }


def test_confusion_matrix_matches_loops():
    pred, target = _random_case()
    m = confusion_matrix(pred, target, 5)
    assert m.dtype == torch.int64 and m.shape == (5, 5)
    expected = np.zeros((5, 5), dtype=np.int64)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(m.numpy(), expected)
    assert int(m.sum()) == int((target != 255).sum())


def test_scores_match_naive_per_image_computation():
    pred, target = _random_case(b=4, num_classes=6, seed=3)
    cm = ConfusionMatrix(6)
    for i in range(4):
        cm.update(pred[i], target[i])
    got = cm.compute()
    want = _naive_scores(pred, target, 6)
    for key in ("miou", "pixel_accuracy", "mean_accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    for a, b in zip(got["per_class_iou"], want["per_class_iou"], strict=True):
        assert a == pytest.approx(b, abs=1e-12)


def test_dataset_miou_is_not_mean_of_image_mious():
    # Image 1: a large class-0 area all correct; image 2: one class-1 pixel predicted as 0.
    target = torch.tensor([[[0, 0, 0, 0]], [[1, 0, 0, 0]]])
    pred = torch.tensor([[[0, 0, 0, 0]], [[0, 0, 0, 0]]])
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    scores = cm.compute()
    # Class 0: TP 7, FP 1 -> 7/8; class 1: TP 0, FN 1 -> 0.
    assert scores["per_class_iou"] == [pytest.approx(7 / 8), 0.0]
    assert scores["miou"] == pytest.approx(7 / 16)
    assert scores["pixel_accuracy"] == pytest.approx(7 / 8)
    assert scores["mean_accuracy"] == pytest.approx(0.5)


def test_absent_classes_reported_as_none_and_excluded():
    target = torch.tensor([[0, 0, 2, 2]])
    pred = torch.tensor([[0, 2, 2, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    scores = cm.compute()
    assert scores["per_class_iou"] == [pytest.approx(0.5), None, pytest.approx(2 / 3), None]
    assert scores["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    # A class predicted but never in the ground truth has IoU 0 and counts.
    cm.update(torch.tensor([[3]]), torch.tensor([[0]]))
    assert cm.compute()["per_class_iou"][3] == 0.0


def test_empty_accumulator_gives_nan():
    scores = ConfusionMatrix(3).compute()
    assert math.isnan(scores["miou"]) and math.isnan(scores["pixel_accuracy"])
    assert scores["per_class_iou"] == [None, None, None]
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert math.isnan(cm.compute()["miou"])


def test_batch_equals_items_and_non_contiguous():
    pred, target = _random_case(b=3)
    batch = ConfusionMatrix(5)
    batch.update(pred, target)
    items = ConfusionMatrix(5)
    for i in range(3):
        items.update(pred[i], target[i])
    assert torch.equal(batch.matrix, items.matrix)
    nc = ConfusionMatrix(5)
    nc.update(pred.transpose(1, 2), target.transpose(1, 2))
    assert not pred.transpose(1, 2).is_contiguous()
    assert torch.equal(nc.matrix, batch.matrix)


def test_update_does_not_modify_inputs_and_accepts_uint8():
    pred, target = _random_case()
    before = pred.clone(), target.clone()
    cm = ConfusionMatrix(5)
    cm.update(pred, target)
    assert torch.equal(pred, before[0]) and torch.equal(target, before[1])
    cm8 = ConfusionMatrix(5)
    cm8.update(pred.to(torch.uint8), target.to(torch.uint8))
    assert torch.equal(cm8.matrix, cm.matrix)


def test_merge_and_reset():
    pred, target = _random_case(b=2)
    a, b, both = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred[0], target[0])
    b.update(pred[1], target[1])
    both.update(pred, target)
    assert a.merge(b) is a
    assert torch.equal(a.matrix, both.matrix)
    a.reset()
    assert int(a.matrix.sum()) == 0
    with pytest.raises(ValueError, match="can only merge a ConfusionMatrix with num_classes=5"):
        a.merge(ConfusionMatrix(4))


def test_all_reduce_without_process_group_is_noop():
    pred, target = _random_case()
    cm = ConfusionMatrix(5)
    cm.update(pred, target)
    before = cm.matrix.clone()
    cm.all_reduce()
    assert torch.equal(cm.matrix, before)


def _ddp_worker(rank, init_file, world, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred, target = _random_case(b=4, seed=11)
        cm = ConfusionMatrix(5)
        cm.update(pred[rank::world], target[rank::world])
        trimap = TrimapAccuracy([1, 3], num_classes=5)
        trimap.update(pred[rank::world], target[rank::world])
        cm.all_reduce()
        trimap.all_reduce()
        torch.save(
            {
                "matrix": cm.matrix,
                "correct": trimap.correct,
                "total": trimap.total,
                "band": trimap.matrices[1].matrix,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), world, str(tmp_path)), nprocs=world)
    pred, target = _random_case(b=4, seed=11)
    full = ConfusionMatrix(5)
    full.update(pred, target)
    trimap = TrimapAccuracy([1, 3], num_classes=5)
    trimap.update(pred, target)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["matrix"], full.matrix)
        assert torch.equal(got["correct"], trimap.correct)
        assert torch.equal(got["total"], trimap.total)
        assert torch.equal(got["band"], trimap.matrices[1].matrix)


def test_bad_inputs_raise():
    pred, target = _random_case()
    with pytest.raises(ValueError, match=r"pred and target must have the same shape.*\(3, 9, 10\)"):
        confusion_matrix(pred[..., :10], target, 5)
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 5\) or 255.*\[7\]"):
        confusion_matrix(pred, target.masked_fill(target == 1, 7), 5)
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 5\).*\[-1\]"):
        confusion_matrix(pred, target.masked_fill(target == 1, -1), 5)
    with pytest.raises(ValueError, match=r"pred labels must be in \[0, 5\).*\[9\]"):
        confusion_matrix(pred.masked_fill(target == 2, 9), target, 5)
    with pytest.raises(
        TypeError, match=r"pred must hold integer class ids; got dtype torch\.float32"
    ):
        confusion_matrix(pred.float(), target, 5)
    with pytest.raises(ValueError, match=r"pred must be \(B, H, W\) or \(H, W\)"):
        confusion_matrix(pred[None], target[None], 5)
    with pytest.raises(TypeError, match=r"target must be a torch\.Tensor"):
        confusion_matrix(pred, target.numpy(), 5)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match=r"matrix must be square \(L, L\)"):
        scores_from_confusion(torch.zeros(2, 3))
    # The accumulator is unchanged by a rejected update.
    cm = ConfusionMatrix(5)
    with pytest.raises(ValueError, match="pred labels must be in"):
        cm.update(pred + 10, target)
    assert int(cm.matrix.sum()) == 0


# --- trimap -----------------------------------------------------------------------------------

# Hand-made case: class 0 in columns 0-1, class 1 in columns 2-4, void at (4, 4).
#   target          pred (x = wrong)
#   0 0 1 1 1       x . . . x
#   0 0 1 1 1       . . . . .
#   0 0 1 1 1       . . x . x
#   0 0 1 1 1       . . . . .
#   0 0 1 1 V       . . . . (any)
# Boundary pixels: columns 1 and 2 (the 0|1 change) and the void pixel (4, 4). Chebyshev
# bands, void excluded:
#   width 0: columns 1-2, 10 px; wrong among them: (2, 2)                          -> 9/10
#   width 1: columns 0-3 (20 px) + (3, 4) next to the void = 21 px; wrong: (0,0) (2,2) -> 19/21
#   width 2: all 24 non-void pixels; wrong: all 4                                   -> 20/24
HAND_TARGET = torch.tensor([[0, 0, 1, 1, 1]] * 4 + [[0, 0, 1, 1, 255]])
HAND_PRED = HAND_TARGET.clone()
HAND_PRED[4, 4] = 0
HAND_PRED[0, 0] = 1
HAND_PRED[0, 4] = 0
HAND_PRED[2, 2] = 0
HAND_PRED[2, 4] = 0


def test_boundary_band_hand_case():
    band0 = torch.zeros(5, 5, dtype=torch.bool)
    band0[:, 1:3] = True
    assert torch.equal(boundary_band(HAND_TARGET, 0), band0)
    band1 = torch.zeros(5, 5, dtype=torch.bool)
    band1[:, :4] = True
    band1[3, 4] = True
    assert torch.equal(boundary_band(HAND_TARGET, 1), band1)
    assert torch.equal(boundary_band(HAND_TARGET, 2), HAND_TARGET != 255)


@pytest.mark.parametrize(("width", "expected"), [(0, 9 / 10), (1, 19 / 21), (2, 20 / 24)])
def test_trimap_accuracy_hand_case(width, expected):
    assert trimap_accuracy(HAND_PRED, HAND_TARGET, width) == pytest.approx(expected)


def _band_reference(target, width):
    """Chebyshev distance to the nearest boundary pixel, by brute force over all pixel pairs."""
    t = target.tolist()
    h, w = len(t), len(t[0])
    boundary = []
    for i in range(h):
        for j in range(w):
            nbrs = [(i + di, j + dj) for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0))]
            changes = t[i][j] != 255 and any(
                0 <= a < h and 0 <= b < w and t[a][b] not in (t[i][j], 255) for a, b in nbrs
            )
            if t[i][j] == 255 or changes:
                boundary.append((i, j))
    out = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            near = any(max(abs(i - a), abs(j - b)) <= width for a, b in boundary)
            out[i, j] = near and t[i][j] != 255
    return out


@pytest.mark.parametrize("width", [0, 1, 2, 4])
def test_boundary_band_matches_brute_force(width):
    g = torch.Generator().manual_seed(width)
    coarse = torch.randint(0, 3, (4, 5), generator=g)
    target = coarse.repeat_interleave(4, 0).repeat_interleave(3, 1)[:14, :13].clone()
    target[torch.rand(target.shape, generator=g) < 0.03] = 255
    assert torch.equal(boundary_band(target, width), _band_reference(target, width))


def test_trimap_incremental_bands_match_one_shot():
    # TrimapAccuracy dilates the bands incrementally (unsorted, repeated widths allowed);
    # boundary_band dilates once by the full width.
    pred, target = _random_case(b=2, h=25, w=31, seed=4)
    coarse = target[:, ::5, ::5].repeat_interleave(5, 1).repeat_interleave(5, 2)
    target = coarse[:, :25, :31].clone()
    widths = [7, 0, 3, 3, 12]
    acc = TrimapAccuracy(widths)
    acc.update(pred, target)
    for k, width in enumerate(widths):
        band = boundary_band(target, width)
        assert int(acc.total[k]) == int(band.sum()) > 0
        assert int(acc.correct[k]) == int((band & (pred == target)).sum())


def test_boundary_band_batch_equals_items_no_leak():
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    target[0, :, 3:] = 1  # a boundary in image 0 only
    band = boundary_band(target, 3)
    assert torch.equal(band[0], boundary_band(target[0], 3))
    assert not band[1].any()  # nothing leaks into image 1, and the border is no boundary


def test_trimap_accumulator_pools_pixels():
    target = torch.stack([HAND_TARGET, HAND_TARGET.flip(-1)])
    pred = torch.stack([HAND_PRED, HAND_TARGET.flip(-1)])  # the second image all correct
    acc = TrimapAccuracy([0, 1, 2], num_classes=2)
    acc.update(pred[0], target[0])
    acc.update(pred[1], target[1])
    result = acc.compute()
    assert result[0] == pytest.approx((9 + 10) / 20)
    assert result[1] == pytest.approx((19 + 21) / 42)
    assert result[2] == pytest.approx((20 + 24) / 48)
    for width in (0, 1, 2):
        assert result[width] == pytest.approx(trimap_accuracy(pred, target, width))
    # mIoU inside the band equals mIoU of a confusion matrix over the band's pixels.
    for width in (0, 2):
        band = boundary_band(target, width)
        masked = torch.where(band, target, torch.full_like(target, 255))
        assert acc.compute_miou()[width] == pytest.approx(_miou(pred, masked, 2))
    acc.reset()
    assert math.isnan(acc.compute()[1])


def _miou(pred, target, num_classes):
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, target)
    return cm.compute()["miou"]


def test_trimap_bad_inputs():
    with pytest.raises(ValueError, match="band_width must be a non-negative int"):
        boundary_band(HAND_TARGET, -1)
    with pytest.raises(ValueError, match=r"pred and target must have the same shape"):
        trimap_accuracy(HAND_PRED[:4], HAND_TARGET, 1)
    with pytest.raises(ValueError, match="band_widths must be a non-empty list"):
        TrimapAccuracy([])
    with pytest.raises(ValueError, match=r"band_widths must be .* ints; got \[1, 2\.5\]"):
        TrimapAccuracy([1, 2.5])
    with pytest.raises(ValueError, match="band_width must be a non-negative int"):
        boundary_band(HAND_TARGET, 1.0)
    assert TrimapAccuracy(np.arange(3)).band_widths == [0, 1, 2]
    with pytest.raises(ValueError, match=r"target must be \(B, H, W\) or \(H, W\)"):
        boundary_band(HAND_TARGET[0], 1)
    with pytest.raises(TypeError, match="target must hold integer class ids"):
        TrimapAccuracy([1]).update(HAND_PRED, HAND_TARGET.float())
    with pytest.raises(ValueError, match="keeps no confusion matrices"):
        TrimapAccuracy([1]).compute_miou()
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 2\)"):
        TrimapAccuracy([1], num_classes=2).update(HAND_PRED, HAND_TARGET + 1)


@pytest.mark.gpu
def test_metrics_cpu_cuda_agree():
    pred, target = _random_case(b=2, h=30, w=40)
    cpu = ConfusionMatrix(5)
    cpu.update(pred, target)
    gpu = ConfusionMatrix(5)
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.matrix.device.type == "cuda"
    assert torch.equal(gpu.matrix.cpu(), cpu.matrix)
    for width in (0, 1, 5):
        assert torch.equal(boundary_band(target.cuda(), width).cpu(), boundary_band(target, width))


def test_dice_and_band_accuracy_on_volumes():
    from deepcrf.metrics import band_accuracy, dice_scores, surface_band

    target = np.zeros((4, 6, 10), np.int64)
    target[:, :, 5:] = 1
    pred = target.copy()
    pred[:, :, 4] = 1  # one wrong column of voxels next to the boundary
    dice = dice_scores(pred, target, 3)
    assert dice[0] == pytest.approx(2 * 96 / (96 + 120)) and dice[2] is None
    assert dice_scores(torch.from_numpy(target), torch.from_numpy(target), 2) == [1.0, 1.0]
    band = surface_band(target, 1.0)
    assert band[:, :, 3:7].all() and not band[:, :, :3].any() and not band[:, :, 7:].any()
    # Spacing is physical: with 2-unit voxels along x the 1.0 band is the boundary pair only.
    assert surface_band(target, 1.0, spacing=(1, 1, 2))[:, :, 3].sum() == 0
    assert band_accuracy(pred, target, 1.0) == pytest.approx(0.75)
    assert np.isnan(band_accuracy(pred, np.zeros_like(target), 1.0))
    with pytest.raises(ValueError, match="same shape"):
        dice_scores(pred[0], target, 2)
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        surface_band(target, 1.0, spacing=(1, 1))
