"""Vocabulary-parallel MT-BKD distillation of a language-model head with ``torchrun``.

Each process holds a slice of the vocabulary of the student's output head and of the teachers'
logits (tensor parallelism); the loss is computed from per-shard statistics, with no gather of
full rows. Run on one machine with two processes::

    torchrun --nproc-per-node 2 examples/torchrun_vocab_parallel.py

(``--nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500`` on each of two
machines for several nodes.) ``--check`` also recomputes the loss in one process on rank 0 from
the gathered logits (a test of the example, not something to do in training).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import mtbkd
from mtbkd.distributed import vocab_parallel_mtbkd_loss


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the input's gradient over the group.

    The hidden states feed every rank's slice of the head, so their gradient is the sum of the
    per-shard contributions (Megatron's "copy to tensor-parallel region").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


def shard_bounds(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, nearly equal slices; the first ``vocab_size % world`` ranks get one more."""
    base, extra = divmod(vocab_size, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=1001)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    v, lo, hi = args.vocab_size, *shard_bounds(args.vocab_size, rank, world)

    # Everything replicated (inputs, labels, trunk) comes from the same seed on every rank; the
    # head and the teachers' logits are sliced to this rank's vocabulary columns.
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=device)
    labels = torch.randint(0, v, (args.tokens,), device=device)
    labels[::17] = -100  # padding tokens
    trunk = torch.nn.Linear(args.hidden, args.hidden).to(device)
    full_head = torch.randn(v, args.hidden, device=device) * 0.05
    head = torch.nn.Parameter(full_head[lo:hi].clone())
    teacher_heads = torch.randn(args.teachers, v, args.hidden, device=device) * 0.2
    with torch.no_grad():
        teacher_logits = torch.einsum("nh,kvh->knv", x, teacher_heads[:, lo:hi])

    params = [*trunk.parameters(), head]
    opt = torch.optim.Adam(params, lr=3e-3)
    for step in range(args.steps):
        opt.zero_grad()
        hidden = _CopyToShards.apply(torch.tanh(trunk(x)))
        student_shard = hidden @ head.t()  # [tokens, hi - lo]
        loss = vocab_parallel_mtbkd_loss(
            student_shard, teacher_logits, labels, vocab_start=lo, vocab_size=v,
            temperature=2.0, concentration=5.0, prior_weight=0.02,
        )  # fmt: skip
        loss.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.6f}  (shard [{lo}, {hi}) of {v})")

    if args.check:
        with torch.no_grad():
            hidden = torch.tanh(trunk(x))
            shard = hidden @ head.t()
            loss = vocab_parallel_mtbkd_loss(shard, teacher_logits, labels, vocab_start=lo,
                                             vocab_size=v)  # fmt: skip
            pieces = [None] * world
            dist.all_gather_object(pieces, (shard.cpu(), teacher_logits.cpu()))
        if rank == 0:
            full = torch.cat([p[0] for p in pieces], -1)
            teachers = torch.cat([p[1] for p in pieces], -1)
            want = mtbkd.mtbkd_loss(full, teachers, labels.cpu())
            print(f"check: vocab-parallel {loss.item():.6f}  single-process {want.item():.6f}")
            assert torch.allclose(loss.cpu(), want, rtol=1e-4, atol=1e-5)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
