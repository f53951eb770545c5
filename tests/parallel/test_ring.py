"""Ring attention over gloo processes equals single-process attention, forward and backward."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.errors import UserError
from lmforge.nn.attention import attend
from lmforge.parallel import RingAttend, ring_attention, zigzag_indices, zigzag_shard, zigzag_unshard

# (B, H, Hkv, T, D, causal, dtype, tolerance)
CASES = [
    (2, 4, 4, 16, 8, True, torch.float64, 1e-10),
    (1, 4, 2, 24, 8, True, torch.float64, 1e-10),  # GQA
    (1, 6, 1, 8, 4, False, torch.float64, 1e-10),  # MQA, full attention
    (2, 4, 2, 32, 16, True, torch.float32, 1e-5),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(rank, world, case):
    B, H, Hkv, T, D, causal, dtype, tol = case
    g = torch.Generator().manual_seed(T * 31 + H)  # every rank builds the same full tensors
    q, dout = torch.randn(B, H, T, D, generator=g, dtype=dtype), torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k, v = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype), torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attend(*full, is_causal=causal)  # SDPA: full fp64 (the textbook version softmaxes in fp32)
    ref.backward(dout)

    local = [zigzag_shard(t, world, rank, dim=2).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=causal)
    out.backward(zigzag_shard(dout, world, rank, dim=2))
    torch.testing.assert_close(out, zigzag_shard(ref, world, rank, dim=2), atol=tol, rtol=tol)
    for mine, theirs in zip(local, full):
        torch.testing.assert_close(mine.grad, zigzag_shard(theirs.grad, world, rank, dim=2), atol=tol, rtol=tol)
    # the whole output, gathered, is the reference
    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out.detach().contiguous())
    torch.testing.assert_close(zigzag_unshard(parts, dim=2), ref.detach(), atol=tol, rtol=tol)


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in CASES:
            _check(rank, world, case)
        # in a subgroup (ranks 1.. as their own ring) the same holds: the ring uses group ranks
        sub = dist.new_group(list(range(1, world)))
        if rank >= 1:
            B, H, T, D = 1, 2, 4 * (world - 1), 4
            q, k, v = (torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3))
            ref = attend(q, k, v, is_causal=True)
            r = dist.get_rank(sub)
            out = ring_attention(*(zigzag_shard(t, world - 1, r, dim=2) for t in (q, k, v)), group=sub)
            torch.testing.assert_close(out, zigzag_shard(ref, world - 1, r, dim=2))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ring_equals_single_process(world):
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)


def test_one_rank_without_distributed_is_plain_attention():
    q, k, v = (torch.randn(2, 4, 12, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attend(q, k, v, is_causal=True, impl=RingAttend())
    torch.testing.assert_close(out, attend(q, k, v, is_causal=True))
    (gq,) = torch.autograd.grad(out.sum(), q)
    (rq,) = torch.autograd.grad(attend(q, k, v, is_causal=True).sum(), q)
    torch.testing.assert_close(gq, rq)


def test_zigzag_layout_balances_and_inverts():
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    x = torch.arange(24).view(1, 24)
    assert torch.equal(zigzag_unshard([zigzag_shard(x, 3, r) for r in range(3)]), x)


def test_indivisible_sequence_is_one_sentence():
    with pytest.raises(UserError, match=r"cannot be split over context-parallel degree 4: it must be a multiple of 2 x 4 = 8"):
        zigzag_shard(torch.zeros(1, 12), 4, 0)
    with pytest.raises(UserError, match="ring attention supports plain causal"):
        RingAttend()(*(torch.zeros(1, 1, 4, 2) for _ in range(3)), mask=torch.ones(4, 4, dtype=torch.bool))
