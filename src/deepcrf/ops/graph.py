"""Range-box graphs on a coarse feature map (Lin et al. 2016, Sec. 4.1): pure index math.

Nodes are the ``h × w`` positions of a feature map, numbered in raster order
``p = y · w + x``.  A node is connected to every other node that lies in a *range box* placed
relative to it; ``a = min(h, w)`` sets the box size, so the graph scales with the map:

* ``"surrounding"``: the box of side ``box_fraction · a`` centred on the node,
  i.e. ``|y_q − y_p| ≤ ρ`` and ``|x_q − x_p| ≤ ρ`` with ``ρ = max(1, box_fraction · a / 2)``.
  The relation is symmetric, so each unordered pair is one factor, stored with the
  raster-earlier node first (``p < q``).
* ``"above_below"``: a box of the same size whose top edge passes through the node, i.e. the
  nodes *below* it: ``0 < y_q − y_p ≤ δ`` and ``|x_q − x_p| ≤ ρ`` with
  ``δ = max(1, box_fraction · a)``.  The edge ``(p, q)`` is ordered: ``p`` is above ``q``, so its
  K×K table ``V(y_p, y_q)`` models "``y_p`` above ``y_q``" (and, read by columns, "below").

Lin et al. use ``box_fraction = 0.4``.  The floor of 1 keeps tiny maps (``a < 5``) connected to
their 8-neighbourhood instead of producing an empty graph.
"""

from __future__ import annotations

import functools
import math

import torch

from deepcrf._checks import check_int

__all__ = ["RELATIONS", "edge_offsets", "range_box_edges", "range_box_extent"]

RELATIONS = ("surrounding", "above_below")
_ALIASES = {"above/below": "above_below", "above-below": "above_below"}


def _relation_name(relation: str) -> str:
    name = _ALIASES.get(relation, relation)
    if name not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}; got {relation!r}")
    return name


def range_box_extent(h: int, w: int, box_fraction: float = 0.4) -> tuple[float, float]:
    """Half-width ρ and depth δ (in nodes) of the range boxes on an ``h × w`` map.

    Args:
        h: map height in nodes.
        w: map width in nodes.
        box_fraction: box side as a fraction of ``a = min(h, w)`` (0.4 in the paper).

    Returns:
        ``(rho, delta)``: ``ρ = max(1, box_fraction·a/2)``, ``δ = max(1, box_fraction·a)``.
    """
    h, w = check_int(h, "h", minimum=1), check_int(w, "w", minimum=1)
    if not (box_fraction > 0.0) or math.isinf(box_fraction):
        raise ValueError(f"box_fraction must be a finite positive number; got {box_fraction!r}")
    a = min(int(h), int(w))
    return max(1.0, box_fraction * a / 2.0), max(1.0, box_fraction * a)


@functools.lru_cache(maxsize=64)
def _edges_cpu(h: int, w: int, relation: str, box_fraction: float) -> torch.Tensor:
    rho, delta = range_box_extent(h, w, box_fraction)
    # A tiny epsilon so that e.g. 0.4 · 15 / 2 = 3.0000000000000004 still gives 3 and an
    # exact 3.0 is not lost to rounding the other way.
    r = math.floor(rho + 1e-9)
    d = math.floor(delta + 1e-9)
    if relation == "surrounding":
        dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
        # Keep half of the symmetric neighbourhood: offsets that point later in raster order.
        keep = (dy > 0) | ((dy == 0) & (dx > 0))
    else:
        dy, dx = torch.meshgrid(torch.arange(1, d + 1), torch.arange(-r, r + 1), indexing="ij")
        keep = torch.ones_like(dy, dtype=torch.bool)
    dy, dx = dy[keep], dx[keep]
    ys = torch.arange(h).repeat_interleave(w)
    xs = torch.arange(w).repeat(h)
    ty = ys[:, None] + dy[None, :]
    tx = xs[:, None] + dx[None, :]
    valid = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
    src = torch.arange(h * w)[:, None].expand_as(ty)[valid]
    dst = (ty * w + tx)[valid]
    return torch.stack([src, dst]).contiguous()


def range_box_edges(
    h: int,
    w: int,
    relation: str,
    *,
    box_fraction: float = 0.4,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Edges of one range-box relation on an ``h × w`` node grid (Lin et al. 2016, Fig. 3).

    Built vectorised from the box's offsets (no Python loop over nodes) and cached per
    ``(h, w, relation, box_fraction)``; the same index tensor serves every image of a batch.

    Args:
        h: map height in nodes.
        w: map width in nodes.
        relation: ``"surrounding"`` or ``"above_below"`` (``"above/below"`` is accepted too).
        box_fraction: range-box side as a fraction of ``min(h, w)`` (0.4 in the paper).
        device: device of the returned tensor.

    Returns:
        ``edges`` with ``edges[0]`` the first node ``p`` and ``edges[1]`` the second node ``q``
        of each factor, raster indices in ``[0, h·w)``, sorted by ``p`` then by offset.

    Shape:
        return: (2, E) int64

    Example:
        >>> range_box_edges(2, 2, "surrounding").tolist()
        [[0, 0, 0, 1, 1, 2], [1, 2, 3, 2, 3, 3]]
    """
    name = _relation_name(relation)
    edges = _edges_cpu(int(h), int(w), name, float(box_fraction))
    # A copy: the cached tensor must not be reachable (and mutable) by the caller.
    return edges.to(device=device, copy=True)


def edge_offsets(edges: torch.Tensor, w: int) -> torch.Tensor:
    """Relative position ``(y_q − y_p, x_q − x_p)`` of each edge in nodes.

    Args:
        edges: ``(2, E)`` raster indices on a map of width ``w``.
        w: map width in nodes.

    Shape:
        edges:  (2, E) int64
        return: (E, 2) int64, columns (dy, dx)
    """
    src, dst = edges[0], edges[1]
    return torch.stack([dst // w - src // w, dst % w - src % w], dim=1)
