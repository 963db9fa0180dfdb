"""Exact likelihood of a whole split in Lightning's test loop, each point once under DDP (docs/design.md §4, §7).

``HOSMModule.test_step`` hands every test batch to a :class:`SplitEvaluation`, which computes per-sample
NLL (nats, float data) or bits/dim (uint8 data, one column per dequantization protocol and repeat)
through the module's one likelihood path; ``on_test_epoch_end`` gathers the rows of all ranks with
Lightning's collectives and summarises them. Each point is evaluated once per protocol and repeat:
the data modules' evaluation loaders shard without padding (``data/sharding.py``), and their batches
carry the dataset index of every point, from which its noise is seeded:

* the dequantization noise and Hutchinson probe of point i in repeat r come from a generator seeded
  with (seed, 'likelihood', split, r, i) (truncated normal: + 'tn'), so they do not depend on the batch
  or the rank. The adaptive solver controls its error over a whole batch, so runs with other world
  sizes or batch sizes agree to about rtol/atol, not bit for bit;
* ``num_repeats`` evaluations per point with fresh noise (the CIFAR-10 protocol uses 5); the mean is
  over points and repeats, the standard error over points of their repeat means.

Batches without indices (a foreign data module) are numbered by rank and position instead: the
results are the same numbers of points, but the noise then depends on the number of processes.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..core.dequantization import TAGS
from ..core.ode import ODEOptions
from ..core.seeding import make_generator
from ..core.stats import mean_se
from ..data.spec import DataSpec
from ..options import EvalOptions

__all__ = ["SplitEvaluation", "gather_rows"]


class SplitEvaluation:
    """Per-point likelihood rows of one split on this rank: ``update`` per batch, ``finish`` at the end.

    A row is [index, value of (protocol, repeat) ..., log q₀(x) or NaN, exact −log₂P(k)/D or NaN]."""

    def __init__(self, options: EvalOptions, spec: DataSpec, split: str, seed: int, ode: ODEOptions):
        self.options, self.spec, self.split, self.seed = options, spec, split, seed
        self.ode = ode.replace(**options.ode)
        self.rows: list[Tensor] = []
        self.nfe: dict = {}
        self.metric: str | None = None
        self.start = time.perf_counter()
        self.count = 0  # points handed to ``positions`` so far

    def positions(self, n: int, rank: int, world_size: int) -> Tensor:
        """Indices for n points of a batch that carries none: this rank's points numbered in the order
        they come, interleaved with the other ranks' (rank, rank + W, ...)."""
        pos = torch.arange(self.count, self.count + n)
        self.count += n
        return rank + world_size * pos

    def columns(self) -> list:
        return self.protocols if self.metric == "bpd" else [None]

    def update(self, module, x: Tensor, index: Tensor) -> None:
        """Evaluate the points x [B, ...] with dataset indices ``index`` [B] through the module."""
        limit = self.options.max_samples
        if limit is not None:
            keep = index < limit
            x, index = x[keep], index[keep]
        if len(x) == 0:
            return
        self.metric = "bpd" if x.dtype == torch.uint8 else "nll"
        self.protocols = self.options.dequantization
        cols = []
        for rep in range(self.options.num_repeats):
            for p in self.columns():
                extra = () if p in (None, "uniform") else ("tn",)
                gens = [make_generator(self.seed, "likelihood", self.split, rep, int(i), *extra, device=x.device)
                        for i in index]
                if p is None:
                    lik = module.log_likelihood(x if x.is_floating_point() else x.float(), gens, self.ode)
                    value, nfe = -lik.logp, lik.nfe
                else:
                    bound, nfe = module.bits_per_dim(x, gens, p, self.options.num_importance, self.ode)
                    value = bound.bpd
                cols.append(value.detach().double().cpu())
                total = self.nfe.setdefault(p, [0.0, 0])
                total[0], total[1] = total[0] + nfe, total[1] + 1
        per = torch.stack(cols, 1).reshape(len(x), self.options.num_repeats, -1).transpose(1, 2).reshape(len(x), -1)
        self.rows.append(torch.cat([index.double().cpu()[:, None], per, self._exact(x)], 1))

    def _exact(self, x: Tensor) -> Tensor:
        """[B, 2]: log q₀(x) (nats) where the density is exact, −log₂P(k)/D for exactly known bytes."""
        out = torch.full((len(x), 2), math.nan, dtype=torch.float64)
        if x.is_floating_point() and self.spec.log_prob is not None:
            out[:, 0] = self.spec.log_prob(x.double().reshape(len(x), -1)).double().cpu()
        if x.dtype == torch.uint8 and self.spec.log_prob_bytes is not None:
            out[:, 1] = (-self.spec.log_prob_bytes(x).double() / (x[0].numel() * math.log(2))).cpu()
        return out

    def finish(self, module) -> dict | None:
        """Gather every rank's rows; the same summary dict on every rank (None if no point was evaluated).

        The summary holds ``mean``, ``se``, ``n``, ``num_repeats``, ``metric`` ('nll' or 'bpd'), ``nfe``,
        ``seconds``, ``world_size``, ``split``; for bits/dim ``dequantization`` (the protocol of
        ``mean``), ``num_importance`` and ``protocols`` ({protocol: {mean, se, nfe, tag, gap, gap_se}});
        ``entropy``/``gap`` and ``kl``/``kl_se`` where the data's entropy / exact density is known; and
        ``per_sample``: {'index': [N], protocol or 'nll': [N, R]} as numpy arrays.
        """
        metric = _agree(module, self.metric)
        if metric is None:
            return None
        self.metric, self.protocols = metric, self.options.dequantization
        cols, r = self.columns(), self.options.num_repeats
        width = 1 + len(cols) * r + 2
        local = torch.cat(self.rows) if self.rows else torch.zeros(0, width, dtype=torch.float64)
        rows = gather_rows(module, local)
        stats = torch.tensor([v for p in cols for v in self.nfe.get(p, [0.0, 0])], dtype=torch.float64)
        stats = module.all_gather(stats.to(module.device)).reshape(-1, 2 * len(cols)).sum(0).cpu()
        per = {p: rows[:, 1 + q * r:1 + (q + 1) * r] for q, p in enumerate(cols)}
        summaries = {p: _summary(per[p], stats[2 * q] / stats[2 * q + 1].clamp_min(1)) for q, p in enumerate(cols)}
        primary = "uniform" if "uniform" in cols else cols[0]
        res = {**summaries[primary], "split": self.split, "metric": metric, "seconds": time.perf_counter() - self.start,
               "world_size": int(module.trainer.world_size)}
        if self.spec.entropy is not None:
            res["entropy"] = float(self.spec.entropy)
        if metric == "nll":
            if "entropy" in res:
                res["gap"] = res["mean"] - res["entropy"]
            diff = rows[:, -2] + per[None].mean(1)  # log q0 − log p, paired per point
            if not torch.isnan(diff).any():
                res["kl"], res["kl_se"] = mean_se(diff)
        else:
            res.update(dequantization=primary, num_importance=self.options.num_importance, protocols={})
            for p in cols:
                entry = {**summaries[p], "tag": TAGS[p], "num_importance": self.options.num_importance}
                gap = per[p].mean(1) - rows[:, -1]  # bits/dim − exact −log₂P/D, paired per point
                if not torch.isnan(gap).any():
                    entry["gap"], entry["gap_se"] = mean_se(gap)
                res["protocols"][p] = entry
        names = {p: ("nll" if p is None else p) for p in cols}
        res["per_sample"] = {"index": rows[:, 0].long().numpy(), **{names[p]: per[p].numpy() for p in cols}}
        return res


def _summary(values: Tensor, nfe: Tensor) -> dict:
    mean, se = mean_se(values.mean(1))
    return {"mean": mean, "se": se, "n": int(values.shape[0]), "num_repeats": int(values.shape[1]), "nfe": float(nfe)}


def _agree(module, metric: str | None) -> str | None:
    """The metric of the split, agreed by all ranks (a rank without points has none of its own)."""
    code = torch.tensor([{None: 0, "nll": 1, "bpd": 2}[metric]], device=module.device)
    best = int(module.all_gather(code).max())
    return {0: None, 1: "nll", 2: "bpd"}[best]


def gather_rows(module, local: Tensor) -> Tensor:
    """All ranks' rows [n_r, C] (uneven n_r) as one tensor [N, C] sorted by the index in column 0, on the CPU.

    Lightning's ``all_gather`` needs equal shapes: the row counts are gathered first and every rank
    pads to the largest; RuntimeError if an index occurs twice (the ranks disagree about the data)."""
    device = module.device
    counts = module.all_gather(torch.tensor([len(local)], device=device)).reshape(-1).cpu()
    most = int(counts.max())
    padded = torch.cat([local, local.new_zeros(most - len(local), local.shape[1])]).to(device)
    gathered = module.all_gather(padded).reshape(len(counts), most, local.shape[1]).cpu()
    rows = torch.cat([gathered[w, : int(c)] for w, c in enumerate(counts)])
    rows = rows[torch.argsort(rows[:, 0], stable=True)]
    if len(rows) > 1 and bool((rows[1:, 0] == rows[:-1, 0]).any()):
        raise RuntimeError("a test point was evaluated twice: the ranks' test loaders overlap (use the data module's "
                           "evaluation loader, data/sharding.py eval_loader)")
    return rows
