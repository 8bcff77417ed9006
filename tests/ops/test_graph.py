import itertools

import pytest
import torch

from deepcrf.ops.graph import RELATIONS, edge_offsets, range_box_edges, range_box_extent


def brute_force_edges(h, w, relation, box_fraction=0.4):
    """Every ordered pair of distinct nodes tested against the range box's definition."""
    a = min(h, w)
    rho = max(1.0, box_fraction * a / 2)
    delta = max(1.0, box_fraction * a)
    nodes = [(y, x) for y in range(h) for x in range(w)]
    out = set()
    for (p, (yp, xp)), (q, (yq, xq)) in itertools.product(enumerate(nodes), repeat=2):
        if p == q:
            continue
        dy, dx = yq - yp, xq - xp
        if relation == "surrounding":
            # One factor per unordered pair, the raster-earlier node first.
            if abs(dy) <= rho + 1e-9 and abs(dx) <= rho + 1e-9 and p < q:
                out.add((p, q))
        else:
            if 0 < dy <= delta + 1e-9 and abs(dx) <= rho + 1e-9:
                out.add((p, q))
    return out


SIZES = [(1, 1), (1, 5), (3, 4), (5, 5), (7, 10), (12, 9), (16, 16), (13, 20)]


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("box_fraction", [0.4, 0.75])
def test_edges_match_brute_force(relation, size, box_fraction):
    h, w = size
    edges = range_box_edges(h, w, relation, box_fraction=box_fraction)
    assert edges.dtype == torch.int64 and edges.shape[0] == 2
    got = [tuple(p) for p in edges.t().tolist()]
    assert len(got) == len(set(got)), "duplicate edges"
    assert set(got) == brute_force_edges(h, w, relation, box_fraction)
    # Sorted by first node.
    assert bool((edges[0][1:] >= edges[0][:-1]).all())


def test_extent_follows_shorter_side():
    assert range_box_extent(20, 40) == pytest.approx((4.0, 8.0))
    assert range_box_extent(40, 20) == pytest.approx((4.0, 8.0))
    assert range_box_extent(2, 2) == (1.0, 1.0)  # floor of one node on tiny maps


def test_doc_example_and_alias():
    assert range_box_edges(2, 2, "surrounding").tolist() == [[0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3]]
    assert torch.equal(range_box_edges(6, 7, "above/below"), range_box_edges(6, 7, "above_below"))


def test_returns_a_copy():
    e = range_box_edges(4, 4, "surrounding")
    e.zero_()
    assert range_box_edges(4, 4, "surrounding").max() > 0


def test_offsets():
    h, w = 6, 7
    e = range_box_edges(h, w, "above_below")
    off = edge_offsets(e, w)
    for (p, q), (dy, dx) in zip(e.t().tolist(), off.tolist(), strict=True):
        assert (q // w - p // w, q % w - p % w) == (dy, dx)
    assert bool((off[:, 0] > 0).all())  # q is always below p


def test_bad_input():
    with pytest.raises(ValueError, match="relation must be one of"):
        range_box_edges(4, 4, "left")
    with pytest.raises(ValueError, match="h must be >= 1"):
        range_box_edges(0, 4, "surrounding")
    with pytest.raises(ValueError, match="box_fraction must be"):
        range_box_edges(4, 4, "surrounding", box_fraction=-1.0)


def test_device(devices):
    for dev in devices:
        assert range_box_edges(5, 5, "surrounding", device=dev).device.type == dev.type
