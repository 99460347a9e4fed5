"""Data-parallel training on ``torch.distributed``: each rank fits a share of every batch.

Launched by ``torchrun --nproc-per-node K`` with ``training.distributed: true`` (``PNMF(...,
distributed=True)``), every one of the K processes holds the whole model (q(v) of the GP,
the Gaussian prior's per-spot parameters, W) and the whole data, and:

* draws the SAME batch indices as the others (same seed, same generator stream: the batch
  stream is the single-process one), and takes its contiguous 1/K share of the batch's
  spots (all of the batch's genes);
* computes the ELBO terms that sum over spots on its share only: the likelihood (scaled
  by N / B of the *whole* batch) and its share ``B_k / B`` of the KL term (the Gaussian
  prior's KL is a sum over the batch's spots, scaled by N / B; the GP's lives on the
  inducing points), so the K local values add up to the single-process ELBO;
* completes, before each update, what that update sums over spots: the gradients of every
  optimiser parameter (all-reduce SUM of ``.grad``; a spot's Gaussian-prior parameters get
  a gradient only on the rank that owns the spot, the others add zeros), the natural-gradient
  statistics ``g_mu = A g_mean`` and ``g_S = A diag(g_var) A^T`` of q(v) (and the trust
  region's largest move, MAX; a curvature sample of a mini-batch is drawn from the whole
  batch, as one process draws it, and each rank sums the part in its share), and the
  multiplicative W step's numerator and denominator (with their running averages on
  mini-batches);
* reports the all-reduced ELBO, and stops when any rank's stopping rule (or callback) says
  so, so all ranks take the same number of steps.

The result is the single-process fit on the same batches up to the order of float additions
(gradients add over the shares instead of over the whole batch). Each rank's update is then
the same computation on the same numbers, so the replicas stay equal without broadcasts.

Not split (computed identically on every rank, from the same data and seed): the KL-NMF
initialisation and GP warm start, the first estimate of the loadings' running statistics,
the ELBO on the fixed evaluation block and the held-out deviance. Their cost is the
single-process one on each rank; splitting them is future work.

In the Monte Carlo ELBO modes (``expanded``, ``simple``) every rank draws the noise of the
whole batch, as the single process does, and uses its share's columns.

Backends: gloo on the CPU, NCCL on GPUs (rank k uses ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import atexit
import os
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from sf_mlflow.errors import ConfigError, ModelError
from sf_mlflow.models._training import Trainer
from sf_mlflow.models.likelihood import (CountBatch, _mm_ratio, expected_log_likelihood,
                                         likelihood_and_statistics)
from sf_mlflow.models.priors import FactorPrior

__all__ = ["Communicator", "DistributedTrainer", "launched_by_torchrun", "LAUNCH"]

#: Environment variables torchrun sets for every worker (the default ``env://`` rendezvous).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: How to launch a distributed train stage (shown in errors and the README).
LAUNCH = ("torchrun --nproc-per-node K -m sf_mlflow.cli train -c CONFIG "
          "--set training.distributed=true")


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker (its rendezvous variables are set)."""
    return all(os.environ.get(k) for k in TORCHRUN_ENV)


class Communicator:
    """The collectives a data-parallel fit needs, over the default process group.

    Attributes
    ----------
    rank, world_size : int
    device : torch.device
        This rank's device: the CPU (gloo), or ``cuda:LOCAL_RANK`` (NCCL).
    """

    def __init__(self, device: torch.device):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device

    @classmethod
    def join(cls, device: torch.device, key: str = "training.distributed") -> "Communicator":
        """Join (or reuse) the process group torchrun set up; ``device`` is the resolved
        ``training.device`` (a CUDA device becomes ``cuda:LOCAL_RANK``).

        Raises ConfigError naming ``key`` when the process was not started by torchrun.
        """
        if not dist.is_initialized():
            if not launched_by_torchrun():
                missing = ", ".join(k for k in TORCHRUN_ENV if not os.environ.get(k))
                raise ConfigError(
                    f"{key} = true needs a process started by torchrun (it sets {missing}, "
                    f"which are missing here); launch it as `{LAUNCH}`, or set {key}: false")
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            # torch.distributed.nn.functional binds ``group.WORLD`` into its functions' default
            # arguments when imported. Imported after the group exists (torch.optim imports it,
            # through torch._dynamo, at the first optimiser), those defaults pin the group for
            # the life of the interpreter: destroy_process_group cannot free it, and its gloo
            # threads are torn down during interpreter exit, which now and then aborts the
            # process ("terminate called without an active exception"). Imported first, the
            # defaults are None.
            import torch.distributed.nn.functional  # noqa: F401
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            # A script that never calls leave() still frees the group while Python is alive.
            atexit.register(cls.leave)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return cls(device)

    @staticmethod
    def leave() -> None:
        """Tear the process group down (at the end of a distributed stage, and at exit).

        Its gloo threads end here, while the interpreter is alive (see :meth:`join`).
        """
        if dist.is_initialized():
            dist.destroy_process_group()

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (shares differ in size by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over all ranks (a new tensor)."""
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def max(self, value: Tensor) -> Tensor:
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def sum_all(self, *values: Tensor) -> tuple[Tensor, ...]:
        """Sums over all ranks of tensors of one dtype, in a single all-reduce."""
        flat = self.sum(torch.cat([v.reshape(-1) for v in values]))
        out, pos = [], 0
        for v in values:
            out.append(flat[pos:pos + v.numel()].view_as(v))
            pos += v.numel()
        return tuple(out)

    def any(self, flag: bool) -> bool:
        return bool(self.max(torch.tensor([int(bool(flag))], device=self.device))[0])

    def broadcast(self, obj=None, src: int = 0):
        """``obj`` of rank ``src`` on every rank (a picklable object)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]


class DistributedTrainer(Trainer):
    """:class:`~sf_mlflow.models._training.Trainer` whose steps are split across ranks.

    Fills the base trainer's hooks (``_spots_in``, ``_kl``, ``_total``, ``_reduce_grads``,
    ``_agree``) and replaces its batch stream with this rank's share of each batch; only
    rank 0 prints progress. See the module docstring for what is split and what is not.
    """

    #: A rank that left its step on a signal would leave the others waiting in a collective.
    INTERRUPTIBLE = False

    def __init__(self, p: dict, *args, comm: Communicator, **kwargs):
        p = {**p, "verbose": p["verbose"] and comm.rank == 0}
        super().__init__(p, *args, **kwargs)
        self.comm = comm
        if self.natural is not None:
            self.natural.comm = comm
        smallest = min(self.N if self.p["batch_size"] is None else self.p["batch_size"], self.N)
        if smallest < comm.world_size:
            raise ModelError(f"training.batch_size = {smallest} spots cannot be shared by "
                             f"{comm.world_size} processes: use at least one spot per process")
        self._batch_spots = 0
        self._local: Optional[CountBatch] = None

    def _batches(self) -> Iterator[tuple[CountBatch, Tensor, Optional[Tensor]]]:
        """This rank's share of each batch the single-process trainer would draw."""
        p = self.p
        all_spots = p["batch_size"] is None or p["batch_size"] >= self.N
        all_genes = p["y_batch_size"] is None or p["y_batch_size"] >= self.D
        if all_spots and all_genes:
            share = self._block(np.arange(self.N)[self.comm.share(self.N)], None)
            self._batch_spots, self._local = self.N, share[0]
            while True:
                yield share
        while True:
            si, gi = next(self.spot_stream), next(self.gene_stream)
            block = self._block(si[self.comm.share(len(si))], None if all_genes else gi)
            self._batch_spots, self._local = len(si), block[0]
            yield block

    def _spots_in(self, batch: CountBatch) -> int:
        # the evaluation block is scored whole on every rank: its own size
        return self._batch_spots if batch is self._local else batch.n_spots

    def _kl(self, module: FactorPrior, idx: Tensor) -> Tensor:
        return module.kl(idx) * (idx.shape[0] / self._batch_spots)

    def _total(self, value: Tensor) -> Tensor:
        return self.comm.sum(value)

    def _reduce_grads(self) -> None:
        grads = [prm.grad for prm in self.params if prm.grad is not None]
        if grads:
            for g, total in zip(grads, self.comm.sum_all(*grads)):
                g.copy_(total)

    def _agree(self, stop: bool) -> bool:
        return self.comm.any(stop)

    def _likelihood(self, batch: CountBatch, mean: Tensor, var: Tensor,
                    gidx: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """As the base trainer's, with the Monte Carlo draws of this rank's columns of the whole
        batch's draw and the multiplicative W step from its statistics summed over all ranks."""
        p = self.p
        W = self.loadings() if gidx is None else self.loadings()[gidx]
        gen = self.gen if p["mode"] == "lower-bound" else _ShareOfDraw(self)
        kw = dict(mode=p["mode"], num_samples=p["num_samples"], generator=gen)
        if not (self.train_loadings and not self.gradient_loadings):
            return expected_log_likelihood(batch, mean, var, W, **kw), None
        ll, numer, spot_sums = likelihood_and_statistics(batch, mean, var, W, **kw)
        numer, spot_sums = self.comm.sum_all(numer, spot_sums)
        return ll, _mm_ratio(W.detach(), numer, spot_sums)


class _ShareOfDraw:
    """Standard normal noise for a rank's share of a batch: its columns (spots) of the draw
    the single-process fit makes for the whole batch, from the same generator state."""

    def __init__(self, trainer: DistributedTrainer):
        self.trainer = trainer

    def draw(self, shape: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
        t = self.trainer
        whole = torch.randn((*shape[:-1], t._batch_spots), generator=t.gen, device=device, dtype=dtype)
        return whole[..., t.comm.share(t._batch_spots)]
