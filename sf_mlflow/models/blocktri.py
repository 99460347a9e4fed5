"""Lower-triangular matrices stored by column blocks, and ``colsum((Lu^T A)^2)`` on them.

The SVGP variance term needs, for L lower-triangular ``Lu_l`` (M x M) and one ``A`` (M x B),
``colsum((Lu_l^T A)^2)``. Dense, that is ``2 L M^2 B`` flops forward and as many backward,
half of them multiplying zeros. Here the strict lower triangles are stored cut into column
blocks of width b: block ``i0:i1`` holds rows ``i0:M`` of those columns for all factors as
one contiguous ``(K, L, b)`` array (``K = M - i0``). Viewed as ``(K, L b)`` it is a GEMM
operand as it lies, so

    (A^T Lu_l)[:, i0:i1] for all l  =  A^T[:, i0:] @ block     (one (B, K) x (K, L b) GEMM)

and the gradient of a block is one GEMM written straight into the gradient's storage. With
k blocks the work is ``(k + 1) / (2 k)`` of dense: no gathers, scatters or zero fills of
M^2-sized arrays, which on a CPU cost as much as the arithmetic they would save. The factor
index sits before the column index so that the per-factor sums over a block's columns run
over contiguous memory (reducing over a strided middle axis is ~20x slower on CPUs).

The top ``b x b`` square of every block also holds its upper triangle and diagonal; those
entries are ignored (the diagonal lives in a separate ``d: (L, M)``), get zero gradient and,
so that optimisers leave them alone, are initialised to zero.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

__all__ = ["BlockLayout", "default_block_size", "triangular_quad", "strict_lower_sq_norm"]


def default_block_size(M: int) -> int:
    """Block width for M columns: ~16 blocks (6% above the triangular minimum of work),
    each at least 32 wide so that every GEMM stays large enough to run near peak.

    Widths are multiples of 16 (64 bytes of float32): with L = 10, a width of 125 (rows of
    1,250 floats) ran MKL's SGEMM at 75% of its speed at 128 (cache-set conflicts of the
    odd row stride), measured at M = B = 2,000.
    """
    return max(32, -(-M // 256) * 16)


@functools.lru_cache(maxsize=16)
def _strict_lower_mask(b: int, device: str) -> Tensor:
    """(b, 1, b) float: 1 strictly below the diagonal (row > column), 0 on and above it."""
    return torch.ones(b, b, device=device).tril(-1)[:, None, :]


class BlockLayout:
    """Column-block storage of L strictly-lower-triangular M x M matrices in one flat array.

    Parameters
    ----------
    M : int
        Matrix size.
    L : int
        Number of matrices.
    block : int
        Column-block width b.

    Attributes
    ----------
    blocks : list of (i0, i1, offset)
        Columns ``i0:i1`` occupy ``storage[offset : offset + (M - i0) L (i1 - i0)]``, viewed as
        ``(M - i0, L, i1 - i0)``: entry ``[r, l, c]`` is ``Lu_l[i0 + r, i0 + c]``.
    size : int
        Length of the storage, ``L sum_i (M - i0) b_i`` (~ L M^2 (1 + 1 / k) / 2).
    """

    def __init__(self, M: int, L: int, block: int):
        if M < 1 or L < 1 or block < 1:
            raise ValueError(f"BlockLayout needs M, L, block >= 1, got {M}, {L}, {block}")
        self.M, self.L, self.block = int(M), int(L), int(block)
        self.blocks: list[tuple[int, int, int]] = []
        offset = 0
        for i0 in range(0, self.M, self.block):
            i1 = min(i0 + self.block, self.M)
            self.blocks.append((i0, i1, offset))
            offset += (self.M - i0) * self.L * (i1 - i0)
        self.size = offset

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockLayout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, int, int]:
        return self.M, self.L, self.block

    def view(self, storage: Tensor, i: int) -> Tensor:
        """Block i of the flat ``storage: (size,)`` as a (K, L, b) view."""
        i0, i1, offset = self.blocks[i]
        K, b = self.M - i0, i1 - i0
        return storage[offset:offset + K * self.L * b].view(K, self.L, b)

    @functools.lru_cache(maxsize=4)
    def _ignored(self, device: str) -> Tensor:
        # Only the top b x b square of a block holds ignored entries (rows below it are all
        # strictly lower), so this index has ~L M b / 2 entries, not one per stored number.
        out = []
        for i0, i1, offset in self.blocks:
            b = i1 - i0
            r, c = torch.triu_indices(b, b, device=device)                  # r <= c
            l = torch.arange(self.L, device=device)
            out.append((offset + (r[:, None] * self.L + l[None, :]) * b + c[:, None]).reshape(-1))
        return torch.cat(out)

    def ignored_positions(self, device) -> Tensor:
        """Positions in the storage that hold no strict-lower entry (the upper triangle and
        diagonal of each block's top square; ~L M b / 2 of them), LongTensor."""
        return self._ignored(str(torch.device(device)))

    def to_dense(self, storage: Tensor, diag: Optional[Tensor] = None) -> Tensor:
        """``(L, M, M)`` lower-triangular matrices from ``storage: (size,)`` and ``diag: (L, M)``.

        Differentiable; built block by block from views, without index arrays.
        """
        out = storage.new_zeros(self.L, self.M, self.M)
        for i, (i0, i1, _) in enumerate(self.blocks):
            W = self.view(storage, i)                                       # (K, L, b)
            b = i1 - i0
            out[:, i0:i1, i0:i1] = torch.tril(W[:b].permute(1, 0, 2), -1)
            out[:, i1:, i0:i1] = W[b:].permute(1, 0, 2)
        if diag is not None:
            out = out + torch.diag_embed(diag)
        return out

    def from_dense(self, Lu: Tensor) -> Tensor:
        """Storage ``(size,)`` holding the strict lower triangles of ``Lu: (L, M, M)``
        (ignored positions are zero)."""
        out = Lu.new_zeros(self.size)
        for i, (i0, i1, _) in enumerate(self.blocks):
            W = self.view(out, i)
            b = i1 - i0
            W[:b] = torch.tril(Lu[:, i0:i1, i0:i1], -1).permute(1, 0, 2)
            W[b:] = Lu[:, i1:, i0:i1].permute(1, 0, 2)
        return out


def _top(W: Tensor, d: Tensor, i0: int, i1: int) -> Tensor:
    """A block's top b x b square, upper triangle zeroed and ``d`` on the diagonal, (b, L, b)."""
    b = i1 - i0
    top = W[:b] * _strict_lower_mask(b, str(W.device))
    top.diagonal(dim1=0, dim2=2).copy_(d[:, i0:i1])
    return top


class _TriangularQuad(torch.autograd.Function):
    """``colsum((Lu_l^T A_l)^2)`` for every l; see :func:`triangular_quad`.

    Forward keeps the blocks of ``Q_l = A^T Lu_l`` (L B M numbers) for the backward pass
    (only when one is coming: prediction holds one block at a time),
    where ``dLu_l[i0:, i0:i1] = A[i0:] (2 g_l * Q_l[:, i0:i1])`` is one GEMM per block. ``dA``
    is formed only when A needs a gradient (trained hyperparameters). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, At: Tensor, storage: Tensor, d: Tensor, layout: BlockLayout,  # type: ignore[override]
                keep: bool) -> Tensor:
        L = d.shape[0]
        shared = At.dim() == 2
        B = At.shape[-2]
        out = At.new_zeros((B, L) if shared else (L, B))
        saved = []
        for i, (i0, i1, _) in enumerate(layout.blocks):
            W = layout.view(storage, i)                                   # (K, L, b)
            K, b = W.shape[0], W.shape[2]
            top = _top(W, d, i0, i1)
            if shared:
                Q = torch.mm(At[:, i0:i1], top.view(b, L * b))
                if K > b:
                    Q.addmm_(At[:, i1:], W[b:].view(K - b, L * b))
                Q = Q.view(B, L, b)
            else:
                Q = torch.bmm(At[:, :, i0:i1], top.permute(1, 0, 2))      # (L, B, b)
                if K > b:
                    Q.baddbmm_(At[:, :, i1:], W[b:].permute(1, 0, 2))
            # a norm reads Q once; Q * Q would also write and re-read a B x L x b array
            out += torch.linalg.vector_norm(Q, dim=2).square_()
            if keep:  # without a backward pass ahead, each block is freed at once
                saved.append(Q)
        ctx.layout, ctx.shared = layout, shared
        ctx.save_for_backward(At, storage, d, *saved)
        return out.T.contiguous() if shared else out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        At, storage, d, *saved = ctx.saved_tensors
        layout, shared = ctx.layout, ctx.shared
        L = d.shape[0]
        B = At.shape[-2]
        need_A, need_s, need_d = ctx.needs_input_grad[:3]
        gA = torch.zeros_like(At) if need_A else None
        # every storage entry lies in exactly one block and is written below: no zero fill
        gs = torch.empty_like(storage) if need_s else None
        gd = torch.empty_like(d) if need_d else None
        g2 = (2.0 * grad.T)[:, :, None] if shared else (2.0 * grad)[:, :, None]   # (B|L, L|B, 1)
        # dloss/dQ of each block goes to one buffer: fresh large allocations page-fault
        buf = torch.empty(max(q.numel() for q in saved), dtype=At.dtype, device=At.device)
        for i, ((i0, i1, _), Q) in enumerate(zip(layout.blocks, saved)):
            G = torch.mul(Q, g2, out=buf[:Q.numel()].view(Q.shape))
            K, b = layout.M - i0, i1 - i0
            if need_s or need_d:
                gW = layout.view(gs, i) if need_s else At.new_empty(K, L, b)
                if shared:
                    torch.mm(At[:, i0:].T, G.view(B, L * b), out=gW.view(K, L * b))
                else:
                    gW.copy_(torch.bmm(At[:, :, i0:].mT, G).permute(1, 0, 2))
                if need_d:
                    gd[:, i0:i1] = gW[:b].diagonal(dim1=0, dim2=2)
                gW[:b] *= _strict_lower_mask(b, str(gW.device))
            if need_A:
                W = layout.view(storage, i)
                top = _top(W, d, i0, i1)
                if shared:
                    Gm = G.view(B, L * b)
                    gA[:, i0:i1] += Gm @ top.view(b, L * b).T
                    if K > b:
                        gA[:, i1:] += Gm @ W[b:].reshape(K - b, L * b).T
                else:
                    gA[:, :, i0:i1] += torch.bmm(G, top.permute(1, 2, 0))
                    if K > b:
                        gA[:, :, i1:] += torch.bmm(G, W[b:].permute(1, 2, 0))
        return gA, gs, gd, None, None


def triangular_quad(At: Tensor, storage: Tensor, d: Tensor, layout: BlockLayout) -> Tensor:
    """``colsum((Lu_l^T A_l)^2)`` for every factor, (L, B).

    Parameters
    ----------
    At : Tensor, (B, M) or (L, B, M)
        ``A^T``, shared by all factors or one per factor.
    storage : Tensor, (layout.size,)
        Strict lower triangles of the ``Lu_l`` in ``layout``.
    d : Tensor, (L, M)
        Their diagonals.
    layout : BlockLayout

    Returns
    -------
    Tensor, (L, B)
        Differentiable in all three tensors.
    """
    L, M = d.shape
    if storage.shape != (layout.size,) or (layout.M, layout.L) != (M, L) or At.shape[-1] != M:
        raise ValueError(f"triangular_quad: At {tuple(At.shape)}, storage {tuple(storage.shape)} "
                         f"and d {tuple(d.shape)} do not fit a layout of M = {layout.M}, "
                         f"L = {layout.L} ({layout.size} entries)")
    keep = torch.is_grad_enabled() and (At.requires_grad or storage.requires_grad or d.requires_grad)
    return _TriangularQuad.apply(At, storage, d, layout, keep)


class _MaskedSqNorm(torch.autograd.Function):
    """Sum of squares of ``storage`` outside the positions ``ignored``; one array-sized pass each way."""

    @staticmethod
    def forward(ctx, storage: Tensor, ignored: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(storage, ignored)
        total = torch.linalg.vector_norm(storage).square()
        return total - torch.linalg.vector_norm(storage[ignored]).square()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        storage, ignored = ctx.saved_tensors
        g = storage * (2.0 * grad)
        return g.index_fill_(0, ignored, 0.0), None


def strict_lower_sq_norm(storage: Tensor, layout: BlockLayout) -> Tensor:
    """``sum_l ||strict_lower(Lu_l)||_F^2`` of a block-stored ``storage: (size,)``, a scalar."""
    return _MaskedSqNorm.apply(storage, layout.ignored_positions(storage.device))
