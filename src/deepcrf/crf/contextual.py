"""Contextual CRF with CNN pairwise potentials and piecewise training (Lin et al. 2016).

The CRF lives on the nodes of a coarse feature map.  Potentials are *scores* (log-potentials:
higher = more compatible), the outputs ``z`` of small networks on the node features:

    P(y | x) = exp(Σ_p z_p(y_p) + Σ_r Σ_{(p,q) ∈ S_r} z^r_pq(y_p, y_q)) / Z(x)

Lin et al. write the energy with potentials ``U = −z_p`` and ``V = −z_pq``, ``P ∝ exp(−E)``;
the library's compatibility ``μ`` is such an energy too, so ``V ↔ μ`` and ``z ↔ −μ``.

* Graph: range-box relations ``"surrounding"`` and ``"above_below"``
  (:func:`deepcrf.ops.graph.range_box_edges`).
* Unary net: two 1×1 layers (FC per node) from features to K scores.
* Pairwise net (one per relation): two FC layers from ``[f_p, f_q, (dy, dx)/ρ]`` to a K×K table.
* Training: the piecewise likelihood (:func:`piecewise_loss`): a softmax over K per unary and
  over K² per edge, so training needs no inference.
* Inference: parallel mean-field with general K×K tables (:func:`mean_field`), 3 iterations.

Node-major layout inside the functional pieces: unary ``(B, N, K)`` with ``N = h·w`` in raster
order, pairwise ``(B, E, K, K)`` indexed ``[b, e, y_p, y_q]`` for the edge ``(p, q)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepcrf._checks import check_int, check_positive, check_tensor
from deepcrf.metrics import IGNORE_INDEX
from deepcrf.ops.graph import RELATIONS, edge_offsets, range_box_edges, range_box_extent

__all__ = [
    "RELATIONS",
    "ContextualCRF",
    "PairwiseNet",
    "downsample_labels",
    "interaction_part",
    "mean_field",
    "piecewise_loss",
    "range_box_edges",
]


def _as_list(x: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a list/tuple of tensors; got {type(x)}")
    return list(x)


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (it then casts between dtypes itself)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def _check_graph(
    unary: torch.Tensor,
    edges: torch.Tensor | Sequence[torch.Tensor],
    pairwise: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    check_tensor(unary, "unary", ndim=3, layout="(B, N, K)", floating=True, finite=True)
    b, n, k = unary.shape
    edge_list = _as_list(edges, "edges")
    pair_list = _as_list(pairwise, "pairwise")
    if len(edge_list) != len(pair_list):
        raise ValueError(
            f"edges and pairwise must have one entry per relation; got {len(edge_list)} edge "
            f"sets and {len(pair_list)} pairwise tables"
        )
    for i, (e, z) in enumerate(zip(edge_list, pair_list, strict=True)):
        check_tensor(
            e, f"edges[{i}]", ndim=2, layout="(2, E)", dtypes=(torch.int64,), nonempty=False
        )
        if e.shape[0] != 2:
            raise ValueError(f"edges[{i}] must be (2, E); got {tuple(e.shape)}")
        if e.numel() and (int(e.min()) < 0 or int(e.max()) >= n):
            raise ValueError(
                f"edges[{i}] must index nodes in [0, {n}); got range "
                f"[{int(e.min())}, {int(e.max())}]"
            )
        check_tensor(
            z,
            f"pairwise[{i}]",
            ndim=4,
            layout="(B, E, K, K)",
            floating=True,
            finite=True,
            nonempty=False,
        )
        if tuple(z.shape) != (b, e.shape[1], k, k):
            raise ValueError(
                f"pairwise[{i}] must be (B, E, K, K) = {(b, e.shape[1], k, k)} "
                f"matching unary {tuple(unary.shape)} and edges[{i}] "
                f"{tuple(e.shape)}; got {tuple(z.shape)}"
            )
        if z.dtype != unary.dtype or z.device != unary.device:
            raise TypeError(
                f"pairwise[{i}] must have unary's dtype/device ({unary.dtype}, "
                f"{unary.device}); got ({z.dtype}, {z.device})"
            )
    return edge_list, pair_list


def _messages(
    q: torch.Tensor, edge_list: list[torch.Tensor], pair_list: list[torch.Tensor]
) -> torch.Tensor:
    """Σ over the factors touching each node of the expected pairwise score under Q."""
    out = torch.zeros_like(q)
    for e, z in zip(edge_list, pair_list, strict=True):
        if e.shape[1] == 0:
            continue
        src, dst = e[0].to(q.device), e[1].to(q.device)
        # Node p (row of the table) sees Σ_l' z(l, l') Q_q(l'); node q (column) sees
        # Σ_l z(l, l') Q_p(l).
        to_src = torch.einsum("bekl,bel->bek", z, q[:, dst])
        to_dst = torch.einsum("bekl,bek->bel", z, q[:, src])
        out = out.index_add(1, src, to_src).index_add(1, dst, to_dst)
    return out


def mean_field(
    unary: torch.Tensor,
    edges: torch.Tensor | Sequence[torch.Tensor],
    pairwise: torch.Tensor | Sequence[torch.Tensor],
    *,
    iters: int = 3,
    pairwise_scale: float = 1.0,
    pairwise_mode: str = "full",
) -> torch.Tensor:
    """Parallel mean-field inference on a CRF with general K×K edge tables.

    Implements (Lin et al. 2016, Sec. 6, with potentials as scores ``z = −U, −V``)::

        Q_p^0(l) ∝ exp(z_p(l))
        Q_p^{t+1}(l) ∝ exp(z_p(l) + w · [Σ_{(p,q)} Σ_l' z_pq(l, l') Q_q^t(l')
                                        + Σ_{(q,p)} Σ_l' z_qp(l', l) Q_q^t(l')])

    all nodes updated at once from the previous iterate.  Differentiable w.r.t. ``unary`` and
    ``pairwise`` by plain autograd through the iterations.

    Args:
        unary: unary scores ``z_p(l)`` (higher = more likely).
        edges: ``(2, E)`` node indices per relation (a tensor or a list, one per relation).
        pairwise: ``(B, E, K, K)`` scores ``z_pq(y_p, y_q)`` per relation, matching ``edges``.
        iters: number of mean-field updates (3 in the paper; 0 returns ``log_softmax(unary)``).
        pairwise_scale: ``w``, a multiplier on every pairwise message (1 = the model as trained).
        pairwise_mode: ``"full"`` uses the tables as they are (the paper); ``"interaction"``
            first removes each table's row and column means,
            ``z − mean_l' z − mean_l z + mean z``, keeping only the label *interaction*: a
            piecewise-trained table is a whole joint model of its pair, so its row/column parts
            re-count evidence about each node that its unary already holds, once per edge
            (the over-counting of piecewise training; see docs/contextual_crf.md).

    Returns:
        ``log Q``: the log of the approximate marginals (normalised over K).

    Shape:
        unary:    (B, N, K)
        edges:    (2, E_r) int64 per relation
        pairwise: (B, E_r, K, K) per relation
        return:   (B, N, K)
    """
    edge_list, pair_list = _check_graph(unary, edges, pairwise)
    if int(iters) < 0:
        raise ValueError(f"iters must be >= 0; got {iters}")
    _check_mode(pairwise_mode)
    return _mean_field(
        unary, edge_list, pair_list, int(iters), float(pairwise_scale), pairwise_mode
    )


PAIRWISE_MODES = ("full", "interaction")


def _check_mode(mode: str) -> None:
    if mode not in PAIRWISE_MODES:
        raise ValueError(f"pairwise_mode must be one of {PAIRWISE_MODES}; got {mode!r}")


def interaction_part(pairwise: torch.Tensor) -> torch.Tensor:
    """The interaction part of K×K tables: ``z − row mean − column mean + grand mean``.

    ``z(l, l') = a(l) + b(l') + g(l, l')`` with ``g``'s rows and columns summing to zero; this
    returns ``g``.  Adding any ``a(l) + b(l')`` to a table leaves it unchanged.

    Shape:
        pairwise: (..., K, K)
        return:   (..., K, K)
    """
    return (
        pairwise
        - pairwise.mean(-1, keepdim=True)
        - pairwise.mean(-2, keepdim=True)
        + pairwise.mean((-2, -1), keepdim=True)
    )


def _mean_field(
    unary: torch.Tensor,
    edge_list: list[torch.Tensor],
    pair_list: list[torch.Tensor],
    iters: int,
    weight: float,
    mode: str = "full",
) -> torch.Tensor:
    if mode == "interaction":
        pair_list = [interaction_part(z) for z in pair_list]
    log_q = torch.log_softmax(unary, dim=-1)
    for _ in range(iters):
        msg = _messages(log_q.exp(), edge_list, pair_list)
        log_q = torch.log_softmax(unary + weight * msg, dim=-1)
    return log_q


def piecewise_loss(
    unary: torch.Tensor,
    edges: torch.Tensor | Sequence[torch.Tensor],
    pairwise: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    residual: bool = False,
) -> torch.Tensor:
    """Negative piecewise log-likelihood (Lin et al. 2016, Eqs. 5–8).

    The likelihood is factorised over potentials, each normalised on its own::

        P_U(y_p) = softmax_K(z_p)[y_p],   P_V(y_p, y_q) = softmax_{K²}(z_pq)[y_p, y_q]
        −log P = −Σ_p log P_U(y_p) − Σ_r Σ_{(p,q) ∈ S_r} log P_V(y_p, y_q)

    A node labelled ``ignore_index`` drops its unary term and every edge touching it.

    With ``residual=True`` (not in the paper) each edge's softmax is taken of
    ``z_pq(y_p, y_q) + z_p(y_p) + z_q(y_q)`` with the unaries held fixed (no gradient through
    them): a table learns only what the two unaries do not already say, so mean-field does
    not count the node evidence again through 20–64 edges per node (docs/contextual_crf.md).

    Args:
        unary: unary scores ``z_p(l)``.
        edges: ``(2, E)`` node indices per relation (a tensor or a list, one per relation).
        pairwise: ``(B, E, K, K)`` scores per relation, matching ``edges``.
        labels: node labels in ``[0, K)`` or ``ignore_index``.
        reduction: ``"sum"``: the paper's objective, summed over the batch; ``"mean"``: each
            piece (the unaries, then each relation's edges) averaged over its own valid terms
            and the averages summed, so the step size does not depend on the graph's size.
            A piece with no valid term contributes 0.
        ignore_index: the label that marks unlabelled nodes.
        residual: train the tables on the unaries' residual (see above).

    Returns:
        A scalar tensor.

    Shape:
        unary:    (B, N, K)
        edges:    (2, E_r) int64 per relation
        pairwise: (B, E_r, K, K) per relation
        labels:   (B, N) int64
        return:   ()
    """
    edge_list, pair_list = _check_graph(unary, edges, pairwise)
    b, n, _ = unary.shape
    check_tensor(labels, "labels", ndim=2, layout="(B, N)", dtypes=(torch.int64,))
    if tuple(labels.shape) != (b, n):
        raise ValueError(
            f"labels must be (B, N) = {(b, n)} matching unary; got {tuple(labels.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    return _piecewise_loss(
        unary, edge_list, pair_list, labels, reduction, ignore_index, residual=residual
    )


def _piecewise_loss(
    unary: torch.Tensor,
    edge_list: list[torch.Tensor],
    pair_list: list[torch.Tensor],
    labels: torch.Tensor,
    reduction: str,
    ignore_index: int,
    *,
    residual: bool = False,
) -> torch.Tensor:
    b, _, k = unary.shape
    labels = labels.to(unary.device)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= k))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {k}) or {ignore_index}; got values "
            f"{sorted(set(labels[bad].tolist()))[:5]}"
        )
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    # At least float32: half-precision (AMP) scores would round the sums and the term counts.
    work = torch.promote_types(unary.dtype, torch.float32)

    def reduce(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        total = (nll * mask.to(work)).sum()
        if reduction == "sum":
            return total
        return total / mask.sum().clamp(min=1).to(work)

    log_pu = torch.log_softmax(unary.to(work), dim=-1)
    loss = reduce(-log_pu.gather(-1, safe[..., None]).squeeze(-1), valid)
    for e, z in zip(edge_list, pair_list, strict=True):
        src, dst = e[0].to(unary.device), e[1].to(unary.device)
        joint = safe[:, src] * k + safe[:, dst]
        z = z.to(work)
        if residual:
            fixed = unary.detach().to(work)
            z = z + fixed[:, src][..., :, None] + fixed[:, dst][..., None, :]
        log_pv = torch.log_softmax(z.reshape(b, -1, k * k), dim=-1)
        edge_nll = -log_pv.gather(-1, joint[..., None]).squeeze(-1)
        loss = loss + reduce(edge_nll, valid[:, src] & valid[:, dst])
    return loss


def downsample_labels(
    labels: torch.Tensor,
    size: tuple[int, int],
    *,
    num_classes: int,
    stride: float | None = None,
    mode: str = "majority",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Labels on the ``h × w`` node grid from pixel labels.

    Each pixel belongs to one node's cell.  With ``stride=None`` the image is cut into an
    ``h × w`` partition: pixel ``y`` of ``H`` goes to row ``⌊y·h/H⌋``.  With a ``stride`` the node
    ``i`` sits on pixel ``stride·i`` (the backbones' geometry, see
    :mod:`deepcrf.models.backbones`) and owns the pixels nearest to it:
    row ``min(h−1, ⌊(y + stride/2)/stride⌋)``; columns likewise.

    ``"majority"`` gives a node the most frequent label among its cell's labelled pixels (ties:
    the smallest label; no labelled pixel: ``ignore_index``).  ``"nearest"`` takes the one pixel
    at the node: ``stride·i`` (clamped to the image), or the cell's centre
    ``⌊(i+½)·H/h⌋`` without a stride.

    Args:
        labels: pixel labels in ``[0, num_classes)`` or ``ignore_index`` (others raise).
        size: ``(h, w)`` of the node grid.
        num_classes: number of labels K.
        stride: pixels between nodes, or ``None`` for the partition into ``h × w`` cells.
        mode: ``"majority"`` or ``"nearest"``.
        ignore_index: the label of unlabelled pixels.

    Shape:
        labels: (B, H, W) int64
        return: (B, h, w) int64
    """
    check_tensor(labels, "labels", ndim=3, layout="(B, H, W)", dtypes=(torch.int64,))
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be a positive (h, w); got {size}")
    if mode not in ("majority", "nearest"):
        raise ValueError(f"mode must be 'majority' or 'nearest'; got {mode!r}")
    if stride is not None:
        check_positive(stride, "stride")
    bsz, big_h, big_w = labels.shape
    dev = labels.device

    def cells(n_pix: int, n_node: int) -> torch.Tensor:
        pix = torch.arange(n_pix, device=dev, dtype=torch.float64)
        if stride is None:
            return (torch.arange(n_pix, device=dev) * n_node) // n_pix
        return torch.floor((pix + stride / 2) / stride).long().clamp(max=n_node - 1)

    def centres(n_pix: int, n_node: int) -> torch.Tensor:
        if stride is None:
            return ((torch.arange(n_node, device=dev) * 2 + 1) * n_pix) // (2 * n_node)
        pos = torch.arange(n_node, device=dev, dtype=torch.float64) * stride
        return torch.round(pos).long().clamp(max=n_pix - 1)

    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {num_classes}) or {ignore_index}; got values "
            f"{sorted(set(labels[bad].tolist()))[:5]}"
        )
    if mode == "nearest":
        return labels[:, centres(big_h, h)][:, :, centres(big_w, w)].clone()
    cell = (cells(big_h, h)[:, None] * w + cells(big_w, w)[None, :]).expand(bsz, big_h, big_w)
    batch = torch.arange(bsz, device=dev)[:, None, None].expand_as(cell)
    key = ((batch * (h * w) + cell) * num_classes + labels)[valid]
    counts = torch.bincount(key, minlength=bsz * h * w * num_classes)
    counts = counts.view(bsz, h, w, num_classes)
    out = counts.argmax(dim=-1)
    return torch.where(counts.sum(-1) > 0, out, torch.full_like(out, ignore_index))


class PairwiseNet(nn.Module):
    """Pairwise potential network of one relation: two FC layers to a K×K table per edge.

    ``z_pq = W₂ · relu(W₁ · [f_p; f_q; (dy, dx)/ρ] + b₁) + b₂`` reshaped to ``(K, K)``
    (Lin et al. 2016, Sec. 4.3; the relative position is an addition of this library).  The
    first layer is one ``Linear(2C + 2, hidden)`` but is evaluated separably,
    ``W₁ᶠ f_p + W₁ˢ f_q + W₁ʳ r``, so each node's features are projected once rather than once per
    edge.

    Args:
        in_channels: node feature channels C.
        num_classes: K.
        hidden_channels: width of the hidden FC layer (512 in the paper).

    Shape:
        features: (B, N, C)
        edges:    (2, E) int64
        offsets:  (E, 2) relative position (dy, dx) already scaled
        return:   (B, E, K, K)
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.fc1 = nn.Linear(2 * self.in_channels + 2, int(hidden_channels))
        self.fc2 = nn.Linear(int(hidden_channels), self.num_classes**2)

    def forward(
        self, features: torch.Tensor, edges: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """K×K score tables of the given edges (see the class docstring for shapes)."""
        c, k = self.in_channels, self.num_classes
        weight = self.fc1.weight
        proj_p = features @ weight[:, :c].t()
        proj_q = features @ weight[:, c : 2 * c].t()
        rel = offsets.to(features.dtype) @ weight[:, 2 * c :].t() + self.fc1.bias
        hidden = torch.relu(proj_p[:, edges[0]] + proj_q[:, edges[1]] + rel)
        out = self.fc2(hidden)
        return out.view(features.shape[0], edges.shape[1], k, k)


class ContextualCRF(nn.Module):
    """CRF with CNN unary and pairwise potentials on a feature-map grid (Lin et al. 2016).

    Holds the unary net (two 1×1 layers, i.e. FC per node) and one :class:`PairwiseNet` per
    range-box relation.  ``forward`` runs mean-field (:func:`mean_field`);
    :meth:`piecewise_loss` trains all nets without inference (:func:`piecewise_loss`).

    Args:
        in_channels: channels C of the node features (the FeatMap-Net output).
        num_classes: K.
        relations: subset of ``("surrounding", "above_below")``.
        hidden_channels: width of the hidden FC layer of every potential net (512 in the paper).
        box_fraction: range-box side as a fraction of the map's shorter side (0.4 in the paper).
        iters: mean-field iterations at inference (3 in the paper).
        pairwise_scale: multiplier on the pairwise messages at inference (1 = as trained).
        pairwise_mode: ``"full"`` (the paper) or ``"interaction"`` tables at inference (see
            :func:`mean_field`); training is the same.
        residual_pairwise: train the pairwise tables on the unaries' residual
            (:func:`piecewise_loss` with ``residual=True``; not in the paper).

    Shape:
        features: (B, C, h, w)
        return:   (B, K, h, w)  log-marginals log Q (``use_pairwise=False``: unary log-softmax)

    Example:
        >>> crf = ContextualCRF(in_channels=16, num_classes=3, hidden_channels=8)
        >>> crf(torch.randn(2, 16, 5, 6)).shape
        torch.Size([2, 3, 5, 6])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        relations: Sequence[str] = RELATIONS,
        hidden_channels: int = 512,
        box_fraction: float = 0.4,
        iters: int = 3,
        pairwise_scale: float = 1.0,
        pairwise_mode: str = "full",
        residual_pairwise: bool = False,
    ) -> None:
        super().__init__()
        _check_mode(pairwise_mode)
        self.residual_pairwise = bool(residual_pairwise)
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        num_classes = check_int(num_classes, "num_classes", minimum=2)
        hidden_channels = check_int(hidden_channels, "hidden_channels", minimum=1)
        names = [{"above/below": "above_below"}.get(r, r) for r in relations]
        for r in names:
            if r not in RELATIONS:
                raise ValueError(f"relations must be a subset of {RELATIONS}; got {relations!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"relations must not repeat; got {relations!r}")
        if int(iters) < 0:
            raise ValueError(f"iters must be >= 0; got {iters}")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.relations = tuple(names)
        self.box_fraction = check_positive(box_fraction, "box_fraction")
        self.iters = int(iters)
        self.pairwise_scale = float(pairwise_scale)
        self.pairwise_mode = pairwise_mode
        hidden = int(hidden_channels)
        self.unary_net = nn.Sequential(
            nn.Conv2d(self.in_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, self.num_classes, 1),
        )
        self.pairwise_nets = nn.ModuleDict(
            {r: PairwiseNet(self.in_channels, self.num_classes, hidden) for r in self.relations}
        )

    def _check_features(self, features: torch.Tensor) -> None:
        check_tensor(
            features, "features", ndim=4, layout="(B, C, h, w)", floating=True, finite=True
        )
        dtype = self.unary_net[0].weight.dtype
        if features.dtype != dtype and not _autocast(features.device.type):
            raise TypeError(
                f"features must have the module's dtype {dtype}; got {features.dtype} (convert "
                f"the features with .to({dtype}) or the module with .to({features.dtype}))"
            )
        if features.shape[1] != self.in_channels:
            raise ValueError(
                f"features must have C = in_channels = {self.in_channels} "
                f"channels (B, C, h, w); got {tuple(features.shape)}"
            )

    def unary(self, features: torch.Tensor) -> torch.Tensor:
        """Unary scores ``z_p(l)`` of every node, as a map.

        Shape:
            features: (B, C, h, w)
            return:   (B, K, h, w)
        """
        self._check_features(features)
        return self.unary_net(features)

    def potentials(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """All potentials of the CRF on the node grid of ``features``.

        Returns:
            ``(unary, edges, pairwise)`` in the node-major layout of :func:`mean_field`:
            unary ``(B, N, K)``, and per relation (in ``self.relations`` order) edges
            ``(2, E_r)`` and tables ``(B, E_r, K, K)``.
        """
        self._check_features(features)
        h, w = features.shape[-2:]
        unary = self.unary_net(features).flatten(2).transpose(1, 2)
        nodes = features.flatten(2).transpose(1, 2)
        rho, _ = range_box_extent(h, w, self.box_fraction)
        edge_list, pair_list = [], []
        for r in self.relations:
            e = range_box_edges(h, w, r, box_fraction=self.box_fraction, device=features.device)
            # Offsets scaled by the box half-width so the net sees the same range on any map.
            offsets = edge_offsets(e, w).to(features.dtype) / rho
            edge_list.append(e)
            pair_list.append(self.pairwise_nets[r](nodes, e, offsets))
        return unary, edge_list, pair_list

    def forward(
        self, features: torch.Tensor, *, use_pairwise: bool = True, iters: int | None = None
    ) -> torch.Tensor:
        """Log-marginals after mean-field (or the unary prediction), as a map.

        Args:
            features: node features.
            use_pairwise: ``False`` returns ``log_softmax`` of the unary scores alone.
            iters: mean-field iterations (default: ``self.iters``).

        Shape:
            features: (B, C, h, w)
            return:   (B, K, h, w)
        """
        self._check_features(features)
        b, _, h, w = features.shape
        if not use_pairwise or not self.relations:
            return torch.log_softmax(self.unary_net(features), dim=1)
        unary, edges, pairwise = self.potentials(features)
        iters = self.iters if iters is None else int(iters)
        if iters < 0:
            raise ValueError(f"iters must be >= 0; got {iters}")
        # The potentials are well-formed by construction: skip the functional's validation.
        _check_mode(self.pairwise_mode)
        log_q = _mean_field(unary, edges, pairwise, iters, self.pairwise_scale, self.pairwise_mode)
        return log_q.transpose(1, 2).reshape(b, self.num_classes, h, w)

    def piecewise_loss(
        self, features: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"
    ) -> torch.Tensor:
        """Piecewise training loss on node labels (:func:`piecewise_loss`).

        Args:
            features: node features.
            labels: node labels in ``[0, K)`` or 255 (see :func:`downsample_labels`).
            reduction: ``"mean"`` or ``"sum"`` (see :func:`piecewise_loss`).

        Shape:
            features: (B, C, h, w)
            labels:   (B, h, w) int64
            return:   ()
        """
        self._check_features(features)
        check_tensor(labels, "labels", ndim=3, layout="(B, h, w)", dtypes=(torch.int64,))
        b, _, h, w = features.shape
        if tuple(labels.shape) != (b, h, w):
            raise ValueError(
                f"labels must be (B, h, w) = {(b, h, w)} matching features "
                f"{tuple(features.shape)}; got {tuple(labels.shape)}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
        unary, edges, pairwise = self.potentials(features)
        return _piecewise_loss(
            unary, edges, pairwise, labels.reshape(b, h * w), reduction, IGNORE_INDEX,
            residual=self.residual_pairwise,
        )  # fmt: skip
