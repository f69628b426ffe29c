"""Feature exchange across processes for contrastive losses: the one home of collective communication.

Three exchanges, chosen by name in a loss's constructor:

- ``gather``: all-gather with gradient. The backward pass sums, on each rank, the gradients that every
  rank's loss sends to that rank's features (a reduce-scatter).
- ``ring`` / ``bidir_ring``: point-to-point sends of features around a ring (one or both directions);
  each step holds one remote shard at a time, and gradients travel back the way the features came.
- ``local``: no exchange; each rank only sees its own batch.

Everything reads ``torch.distributed`` state when called, so one loss object serves one process or many.

Gradient convention (what the tests assert): with W processes, each rank's loss is its share of the
global loss times W (``mean over ranks of the per-rank losses == global loss``), and each rank's
feature gradient is W times the global loss's gradient for those features. DDP's gradient averaging
(divide by W) then gives exactly the gradient of the global loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "EXCHANGES",
    "average_over_processes",
    "batch_sizes",
    "gather_with_grad",
    "neighbour_exchange",
    "ring_pass",
    "ring_shards",
    "world",
]

EXCHANGES = ("gather", "ring", "bidir_ring", "local")


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's batch size, in rank order (one small all-gather)."""
    size = world()[1]
    if size == 1:
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return torch.cat(sizes).tolist()  # one device-to-host copy


def average_over_processes(tensors: list[torch.Tensor]) -> None:
    """Replaces each tensor in place by its mean over ranks (one flattened all-reduce), as DDP does."""
    size = world()[1]
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's shard (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather(list(out.chunk(size)), x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        total = grad.clone()  # gloo has no reduce-scatter: all-reduce, keep this rank's rows
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _GatherUneven(torch.autograd.Function):
    """all_gather of per-rank row counts that differ: rows are padded to the largest count for the
    collective and the padding dropped; backward pads the gradient the same way before the reduction."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        rank, size = world()
        most = max(sizes)
        ctx.rank, ctx.sizes, ctx.most = rank, sizes, most
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        out = torch.empty((size * most, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather(list(out.chunk(size)), padded)
        return torch.cat([out[r * most : r * most + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        size, most = len(ctx.sizes), ctx.most
        padded = grad.new_zeros((size * most, *grad.shape[1:]))
        start = 0
        for r, n in enumerate(ctx.sizes):
            padded[r * most : r * most + n] = grad[start : start + n]
            start += n
        dist.all_reduce(padded)
        return padded[ctx.rank * most : ctx.rank * most + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """All-gathers (b_r, D) features from every rank into (sum b_r, D), rank order, keeping gradients.

    Args:
        x: this rank's rows.
        sizes: every rank's row count (``batch_sizes``) when they may differ, e.g. at the end of an epoch
            with skipped samples; None when every rank passes the same count.
    """
    if world()[1] == 1:
        return x
    if sizes is None or len(set(sizes)) == 1:
        return _GatherWithGrad.apply(x)
    return _GatherUneven.apply(x, tuple(sizes))


def _buffer(like: torch.Tensor) -> torch.Tensor:
    """A contiguous receive buffer (``empty_like`` would copy a view's strides)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _p2p(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def ring_pass(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sends ``tensors`` to the right neighbour and returns the left neighbour's (no autograd)."""
    rank, size = world()
    left, right = (rank - 1) % size, (rank + 1) % size
    received = [_buffer(t) for t in tensors]
    _p2p([(t.contiguous(), right) for t in tensors], [(r, left) for r in received])
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Sends ``x`` to ``to`` and returns what ``frm`` sent; gradients go back the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, to: int, frm: int) -> torch.Tensor:  # type: ignore[override]
        ctx.to, ctx.frm = to, frm
        out = _buffer(x)
        _p2p([(x.contiguous(), to)], [(out, frm)])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        out = _buffer(grad)
        _p2p([(grad.contiguous(), ctx.frm)], [(out, ctx.to)])
        return out, None, None


class _BidirExchange(torch.autograd.Function):
    """Sends ``left`` to the left neighbour and ``right`` to the right one; returns (from left, from right)."""

    @staticmethod
    def forward(ctx, to_left: torch.Tensor, to_right: torch.Tensor, left: int, right: int):  # type: ignore[override]
        ctx.left, ctx.right = left, right
        from_left, from_right = _buffer(to_right), _buffer(to_left)
        _p2p(
            [(to_left.contiguous(), left), (to_right.contiguous(), right)],
            [(from_left, left), (from_right, right)],
        )
        return from_left, from_right

    @staticmethod
    def backward(ctx, g_from_left: torch.Tensor, g_from_right: torch.Tensor):  # type: ignore[override]
        g_to_left, g_to_right = _buffer(g_from_right), _buffer(g_from_left)
        _p2p(
            [(g_from_left.contiguous(), ctx.left), (g_from_right.contiguous(), ctx.right)],
            [(g_to_left, ctx.left), (g_to_right, ctx.right)],
        )
        return g_to_left, g_to_right, None, None


def neighbour_exchange(x: torch.Tensor, to: int, frm: int) -> torch.Tensor:
    """Differentiable send of ``x`` to rank ``to`` and receive from rank ``frm``."""
    return _NeighbourExchange.apply(x, to, frm)


def ring_shards(x: torch.Tensor, bidirectional: bool = False) -> Iterator[torch.Tensor]:
    """Yields every other rank's ``x`` once, one shard at a time, passed around a ring.

    A plain ring takes W - 1 steps; a bidirectional ring sends both ways and takes ceil((W - 1) / 2).
    Shards are yielded as soon as they arrive, so a caller that consumes each before asking for the
    next holds one remote shard (plus what autograd keeps) at a time.
    """
    rank, size = world()
    if size == 1:
        return
    left, right = (rank - 1) % size, (rank + 1) % size
    if not bidirectional:
        current = x
        for _ in range(size - 1):
            current = neighbour_exchange(current, right, left)  # shard of rank - step
            yield current
        return
    to_left = to_right = x
    for _ in range((size - 1) // 2):
        from_left, from_right = _BidirExchange.apply(to_left, to_right, left, right)
        yield from_left
        yield from_right
        to_left, to_right = from_right, from_left  # keep passing each shard the way it was going
    if (size - 1) % 2:
        yield neighbour_exchange(to_right, right, left)
