"""AntMan's structured weights (Rajbhandari, Shrivastava & He, arXiv 1910.01740): group products and group
low-rank products, mixed between groups by a channel shuffle.

Source. The paper's method section could not be read for this module: the stored copies found (arXiv and ar5iv
abstract pages, OpenReview forum BJgsN3R9Km, paperswithcode) hold only the abstract, keywords and TL;DR ("sparse
low-rank compression modules, trained via knowledge distillation"), and no public code was found. What is built
here follows the abstract ("structured sparsity with low-rank decomposition") and issue 25's text (low-rank,
group / block-diagonal structure, a shuffle of groups); every concrete choice below is ours:

- groups are contiguous, equal slices (``groups`` must divide both sizes of the matrix);
- the shuffle is ShuffleNet's channel shuffle: position ``p`` of a shuffled vector holds element ``p // g`` of
  group ``p % g`` (reshape ``(g, n/g)``, transpose, flatten);
- with ``shuffle=True`` it sits between the two stages of ``grouplowrank`` (mixing the groups inside the
  product) and on the output rows of ``group`` (whose one stage cannot mix: the recurrence then does, as
  ShuffleNet's next group convolution does).

Forms (``x`` has ``in`` features, ``g`` groups):

- ``group`` (``GroupDense``): ``y = S blockdiag(B_1..B_g) x``, ``B_k`` of shape ``(out/g, in/g)``; with the
  shuffle ``S`` output row ``r`` belongs to group ``r % g``. Stores and multiplies ``out * in / g`` values.
- ``grouplowrank`` (``GroupLowRank``, "sparse low-rank"): ``y = blockdiag(U_1..U_g) S blockdiag(V_1..V_g) x``
  with ``V_a`` of shape ``(rank/g, in/g)`` and ``U_b`` of shape ``(out/g, rank/g)``: both factors of a low-rank
  product made block diagonal. Stores and multiplies ``rank * (in + out) / g`` values. Through the shuffle
  ``S`` each ``U_b`` reads ``rank / g^2`` outputs of every ``V_a``, so block ``(b, a)`` of ``W`` is an
  independent product of rank ``rank / g^2`` (``rank`` must be a multiple of ``g^2``): ``W`` is a ``g x g`` grid of
  low-rank blocks, and ``from_dense`` (a truncated SVD per block) is the Frobenius-nearest such matrix. Without
  the shuffle (``rank`` a multiple of ``g``) ``W`` is block diagonal with blocks of rank ``rank / g``. With
  ``groups=1`` it is the plain low-rank product (``forms.LowRank``).

Both products cost exactly as many multiply-adds as they store values (``multiply_adds()``); the fixed
permutations are a function of the shape and ``groups`` and store nothing. In the runtime every stage is one
panel product per group (``antman_kernels``) and a shuffle one pass of copies; in ONNX a stage is one batched
``MatMul`` on ``(g, N, in/g)`` and a shuffle a transpose between reshapes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import WeightForm, uniform_


def _check_groups(out_features: int, in_features: int, groups: int) -> int:
    if groups < 1 or out_features % groups or in_features % groups:
        raise ValueError(f"groups must be a positive divisor of both sizes of a {out_features}x{in_features} "
                         f"matrix (a divisor of {math.gcd(out_features, in_features)}), got {groups}")
    return int(groups)


def shuffle_rows(grouped: torch.Tensor, groups: int, dim: int = -1) -> torch.Tensor:
    """The channel shuffle of ``dim``: from group-contiguous order (group ``k``'s ``n/g`` entries together) to
    interleaved order (entry ``p`` is element ``p // g`` of group ``p % g``).

    >>> shuffle_rows(torch.arange(6), 2).tolist()
    [0, 3, 1, 4, 2, 5]
    """
    dim = dim % grouped.dim()
    shape = grouped.shape
    split = grouped.reshape(*shape[:dim], groups, shape[dim] // groups, *shape[dim + 1:])
    return split.transpose(dim, dim + 1).reshape(shape)


def unshuffle_rows(shuffled: torch.Tensor, groups: int, dim: int = -1) -> torch.Tensor:
    """The inverse of ``shuffle_rows``.

    >>> unshuffle_rows(shuffle_rows(torch.arange(6), 3), 3).tolist()
    [0, 1, 2, 3, 4, 5]
    """
    dim = dim % shuffled.dim()
    shape = shuffled.shape
    split = shuffled.reshape(*shape[:dim], shape[dim] // groups, groups, *shape[dim + 1:])
    return split.transpose(dim, dim + 1).reshape(shape)


def _onnx_grouped_input(graph, x: str, groups: int, width: int) -> str:
    """``x`` (N, groups * width) as (groups, N, width): group ``k`` is columns ``[k*width, (k+1)*width)``."""
    split = graph.node("Reshape", [x, graph.ints([-1, groups, width], "group_shape")])
    return graph.node("Transpose", [split], perm=[1, 0, 2])


def _onnx_rows(graph, y: str, groups: int, width: int, shuffle: bool) -> str:
    """(groups, N, width) as (N, groups * width), in group-contiguous or shuffled (interleaved) order."""
    turned = graph.node("Transpose", [y], perm=[1, 2, 0] if shuffle else [1, 0, 2])   # (N, w, g) or (N, g, w)
    return graph.node("Reshape", [turned, graph.ints([-1, groups * width], "rows_shape")])


class GroupDense(WeightForm):
    """Block-diagonal ``W`` of ``groups`` dense blocks (AntMan's group product), output rows shuffled.

    >>> form = GroupDense.from_dense(torch.arange(16.).reshape(4, 4), groups=2, shuffle=False)
    >>> form.materialize().tolist()[1], form.multiply_adds()
    ([4.0, 5.0, 0.0, 0.0], 8)
    """

    name = "group"

    def __init__(self, out_features: int, in_features: int, groups: int, shuffle: bool = True) -> None:
        super().__init__(out_features, in_features)
        self.groups, self.shuffle = _check_groups(out_features, in_features, groups), bool(shuffle)
        self.blocks = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups))

    def materialize(self) -> torch.Tensor:
        w = torch.block_diag(*self.blocks)                                    # (out, in), rows by group
        return shuffle_rows(w, self.groups, 0) if self.shuffle else w

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        xg = x.reshape(*x.shape[:-1], g, self.in_features // g)               # (..., g, in/g)
        y = torch.einsum("...ki,koi->...ko", xg, self.blocks).reshape(*x.shape[:-1], self.out_features)
        return shuffle_rows(y, g) if self.shuffle else y

    def multiply_adds(self) -> int:
        """Multiply-adds of one product ``W x`` through the structure."""
        return self.blocks.numel()

    def nbytes(self) -> int:
        return self.values_nbytes(self.blocks)

    def onnx_matvec(self, graph, x: str) -> str:
        g = self.groups
        xg = _onnx_grouped_input(graph, x, g, self.in_features // g)                      # (g, N, in/g)
        y = graph.node("MatMul", [xg, graph.weight("blocks_t", self.blocks.transpose(1, 2))])  # (g, N, out/g)
        return _onnx_rows(graph, y, g, self.out_features // g, self.shuffle)

    def runtime_op(self):
        from .antman_kernels import group_op  # Numba loads only when the runtime is used
        return group_op(self.blocks.detach().cpu().numpy(), self.shuffle)

    def options(self) -> dict:
        return {"groups": self.groups, "shuffle": self.shuffle}

    def reset_parameters(self, init_range: float) -> None:
        uniform_(self.blocks, init_range**2 / 3)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, groups: int, shuffle: bool = True) -> "GroupDense":
        """The diagonal blocks of ``weight`` (in the form's row order): the Frobenius-nearest group matrix."""
        form = cls(*weight.shape, groups=groups, shuffle=shuffle)
        g, o, i = form.blocks.shape
        rows = unshuffle_rows(weight.detach(), g, 0) if shuffle else weight.detach()   # rows by group
        grid = rows.reshape(g, o, g, i)                                                # [b, :, a, :]: block (b, a)
        with torch.no_grad():
            form.blocks.copy_(grid[torch.arange(g), :, torch.arange(g), :])
        return form


class GroupLowRank(WeightForm):
    """``W = U S V`` with block-diagonal factors ``U`` (out x rank) and ``V`` (rank x in) and the shuffle ``S``
    between them (AntMan's sparse low-rank product); ``right[a]`` is ``V_a``, ``left[b]`` is ``U_b``.

    >>> w = torch.randn(8, 6)
    >>> form = GroupLowRank.from_dense(w, groups=2, rank=4)             # 2 x 2 blocks of rank 1
    >>> form.multiply_adds(), torch.allclose(form.matvec(torch.eye(6)).T, form.materialize(), atol=1e-6)
    (28, True)
    """

    name = "grouplowrank"

    def __init__(self, out_features: int, in_features: int, groups: int, rank: int, shuffle: bool = True) -> None:
        super().__init__(out_features, in_features)
        g = _check_groups(out_features, in_features, groups)
        unit = g * g if shuffle else g
        if rank < unit or rank % unit:
            raise ValueError(f"rank must be a positive multiple of {'groups^2' if shuffle else 'groups'} = {unit} "
                             f"({g} groups, shuffle={bool(shuffle)}), got {rank}")
        self.groups, self.rank, self.shuffle = g, int(rank), bool(shuffle)
        self.left = nn.Parameter(torch.empty(g, out_features // g, rank // g))    # U_b: (out/g, rank/g)
        self.right = nn.Parameter(torch.empty(g, rank // g, in_features // g))    # V_a: (rank/g, in/g)

    @property
    def block_rank(self) -> int:
        """Rank of each nonzero block of ``W``: ``rank / g^2`` with the shuffle, ``rank / g`` without."""
        return self.rank // (self.groups * self.groups if self.shuffle else self.groups)

    def _grid(self) -> torch.Tensor:
        """``W`` as a (g, out/g, g, in/g) grid of blocks [b, :, a, :]."""
        g, o, i, c = self.groups, self.out_features // self.groups, self.in_features // self.groups, self.block_rank
        if not self.shuffle:
            blocks = torch.bmm(self.left, self.right)                              # (g, o, i): diagonal blocks
            return torch.block_diag(*blocks).reshape(g, o, g, i)
        # U_b's column t*g + a reads row b*c + t of V_a (the shuffle S): block (b, a) = sum_t U[b,:,t,a] V[a,b,t,:]
        return torch.einsum("bota,abti->boai", self.left.reshape(g, o, c, g), self.right.reshape(g, g, c, i))

    def materialize(self) -> torch.Tensor:
        return self._grid().reshape(self.out_features, self.in_features)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        g, lead = self.groups, x.shape[:-1]
        xg = x.reshape(*lead, g, self.in_features // g)
        z = torch.einsum("...ai,ari->...ar", xg, self.right)                      # (..., g, rank/g): V_a x_a
        if self.shuffle:                                                           # S: U_b reads every V_a
            z = shuffle_rows(z.reshape(*lead, self.rank), g).reshape(*lead, g, self.rank // g)
        return torch.einsum("...br,bor->...bo", z, self.left).reshape(*lead, self.out_features)

    def multiply_adds(self) -> int:
        """Multiply-adds of one product ``W x`` through the structure: ``rank * (in + out) / groups``."""
        return self.left.numel() + self.right.numel()

    def nbytes(self) -> int:
        return self.values_nbytes(self.left) + self.values_nbytes(self.right)

    def onnx_matvec(self, graph, x: str) -> str:
        g, width = self.groups, self.rank // self.groups
        xg = _onnx_grouped_input(graph, x, g, self.in_features // g)                       # (g, N, in/g)
        z = graph.node("MatMul", [xg, graph.weight("right_t", self.right.transpose(1, 2))])  # (g, N, rank/g)
        if self.shuffle:
            z = _onnx_grouped_input(graph, _onnx_rows(graph, z, g, width, True), g, width)  # S, regrouped
        y = graph.node("MatMul", [z, graph.weight("left_t", self.left.transpose(1, 2))])    # (g, N, out/g)
        return _onnx_rows(graph, y, g, self.out_features // g, False)

    def runtime_op(self):
        from .antman_kernels import group_lowrank_op  # Numba loads only when the runtime is used
        return group_lowrank_op(self.left.detach().cpu().numpy(), self.right.detach().cpu().numpy(), self.shuffle)

    def options(self) -> dict:
        return {"groups": self.groups, "rank": self.rank, "shuffle": self.shuffle}

    def reset_parameters(self, init_range: float) -> None:
        # A nonzero entry of W sums block_rank products: split its variance evenly between the factors.
        factor_variance = math.sqrt(init_range**2 / 3 / self.block_rank)
        uniform_(self.left, factor_variance)
        uniform_(self.right, factor_variance)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, groups: int, rank: int, shuffle: bool = True) -> "GroupLowRank":
        """A truncated SVD of every block the structure can hold: the Frobenius-nearest such matrix."""
        form = cls(*weight.shape, groups=groups, rank=rank, shuffle=shuffle)
        g, c = form.groups, form.block_rank
        o, i = form.out_features // g, form.in_features // g
        grid = weight.detach().double().reshape(g, o, g, i)
        left = torch.zeros(g, o, c, g if shuffle else 1, dtype=torch.float64)     # [b, :, t, a] (a = 0 unshuffled)
        right = torch.zeros(g, g if shuffle else 1, c, i, dtype=torch.float64)    # [a, b, t, :]
        pairs = [(b, a) for b in range(g) for a in range(g)] if shuffle else [(b, b) for b in range(g)]
        for b, a in pairs:
            u, s, vh = torch.linalg.svd(grid[b, :, a, :], full_matrices=False)
            k = min(c, s.numel())
            root = s[:k].sqrt()
            left[b, :, :k, a if shuffle else 0] = u[:, :k] * root
            right[a, b if shuffle else 0, :k, :] = root[:, None] * vh[:k]
        with torch.no_grad():
            form.left.copy_(left.reshape(g, o, -1))
            form.right.copy_(right.reshape(g, -1, i))
        return form

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_rank={self.block_rank}"
