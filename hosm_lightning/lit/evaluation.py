"""Exact ODE likelihood of a whole data split at test time, correct under DDP (DESIGN.md §4, §7).

:class:`LikelihoodEvaluator` is a Lightning callback. At the end of the test epoch every rank
evaluates its shard of the split, the per-sample values of all ranks are gathered, and each
sample is counted exactly once:

* **Sharding.** ``DistributedSampler(shuffle=False, drop_last=False)`` over the split's dataset.
  The sampler pads the index list by repeating the first indices so that every rank gets the
  same number of samples. We keep the dataset index of every value, gather (index, values)
  from all ranks with one ``all_gather`` and drop the duplicates by index. Every rank therefore
  calls the same collectives the same number of times, whatever the dataset size.
* **Noise that does not depend on the world size.** The dequantization noise u (8-bit images)
  and the Hutchinson probe v of sample ``i`` in repeat ``r`` come from a generator seeded with
  (seed, 'likelihood', split, r, i). They are the same whatever batch or rank the sample lands
  in. The adaptive solver still controls its error over the whole batch, so a sample's value
  depends on its batch mates to within the solver tolerance. Runs with other world sizes or
  batch sizes agree to about rtol/atol, not bit for bit.
* **Repeats.** ``num_repeats`` evaluations per sample, each with fresh u and v (the reference
  protocol for CIFAR-10 bits/dim uses 5). We report the mean over samples and repeats. The
  standard error is computed over samples from the per-sample means across repeats, because the
  samples are the independent units.
* **Weights and module.** The callback calls ``pl_module.score_model``, the unwrapped score
  network. It never calls the DDP wrapper: an adaptive solver takes a different number of steps
  on each rank, so a wrapped forward would hang. At test time the module holds the weights of
  the checkpoint's ``state_dict``, which are the EMA weights when ``EMAWeightAveraging`` was on.
  The same holds right after ``fit`` in the same process, because ``on_train_end`` copies the
  average into the module.

Logged (once per split, the same value on every rank): ``<split>/nll`` and ``<split>/nll_se``
(nats, low-D data), or ``<split>/bpd`` and ``<split>/bpd_se`` (uint8 images); also
``<split>/nfe`` (mean score evaluations per ODE solve), ``<split>/n``, and ``<split>/nll_gap``
when the data module knows its entropy. Rank 0 can also write the per-sample values to a .npz
or .csv file.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset

from ..core.likelihood import dequantize, nats_to_bpd, ode_log_likelihood
from ..core.losses import rademacher, resolve_divergence
from ..core.seeding import make_generator
from .module import batch_tensor

__all__ = ["LikelihoodEvaluator", "BitsPerDim", "shard_indices", "gather_unique", "summarize"]

SPLITS = ("test", "val")


def shard_indices(n: int, world_size: int, rank: int) -> list[int]:
    """This rank's dataset indices: ``DistributedSampler(shuffle=False, drop_last=False)`` order.

    Every rank receives ``ceil(n / world_size)`` indices. The last ranks may repeat the first
    indices of the dataset (padding), and :func:`gather_unique` removes those repeats.
    """

    class _Sized:
        def __len__(self) -> int:
            return n

    return list(DistributedSampler(_Sized(), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False))


def gather_unique(strategy, local: Tensor, n_expected: int) -> Tensor:
    """All-gather per-sample rows ``[index, values...]`` (float64, the same row count on every
    rank) and keep the first row of each index in rank order. Returns [n_expected, C] sorted by index.

    Exactly one collective call (``strategy.all_gather``) on every rank.
    """
    gathered = strategy.all_gather(local)  # [W, n_local, C], or [n_local, C] without a process group
    rows = gathered.reshape(-1, local.shape[-1]).double().cpu()
    idx = rows[:, 0].round().long()
    order = torch.sort(idx, stable=True).indices  # stable: within an index, rank order is kept
    rows, idx = rows[order], idx[order]
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    unique = rows[first]
    if len(unique) != n_expected or not torch.equal(unique[:, 0].long(), torch.arange(n_expected)):
        raise RuntimeError(
            f"likelihood evaluation gathered {len(unique)} distinct samples, expected {n_expected} "
            "(dataset indices 0..N-1 exactly once); the ranks disagree about the dataset"
        )
    return unique


def summarize(values: Tensor) -> dict:
    """Mean over samples and repeats; s.e. over samples of the per-sample repeat means. ``values``: [N, R]."""
    per_sample = values.double().mean(1)
    n = len(per_sample)
    se = (per_sample.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")
    return {"mean": per_sample.mean().item(), "se": se, "n": n, "num_repeats": values.shape[1]}


class LikelihoodEvaluator(L.Callback):
    """Exact probability-flow-ODE likelihood of whole data splits at test time, DDP-correct.

    Args:
        num_repeats: evaluations per sample, each with fresh dequantization noise and Hutchinson
            probe (reference CIFAR-10 protocol: 5).
        splits: which splits to evaluate, in order: ``"test"`` and/or ``"val"``.
        per_sample_path: rank 0 writes the per-sample values (``index``, ``value`` [N, R] and the
            per-sample ``mean``) here. A ``.csv`` suffix writes CSV, any other suffix writes .npz.
            ``{split}`` in the path is replaced by the split name; with several splits and no
            ``{split}``, the split name is appended to the file stem.
        batch_size: samples per ODE solve (default: the split loader's batch size).
        rtol, atol: solver tolerances (default: the module's ``likelihood_rtol/atol``).
        method: torchdiffeq solver (default dopri5, the reference RK45).
        options: torchdiffeq options, e.g. ``{step_size: 0.01}`` for fixed-step 'rk4'/'euler'
            (whose per-sample values do not depend on the batch composition at all).
        divergence: 'auto' (exact for D <= 4), 'exact' or 'hutchinson'.
        seed: base seed of the per-sample noise (default: the module's ``seed``).
        results_path: rank 0 also writes a JSON summary per split here (``{split}`` as above).
        max_samples: evaluate only the first ``max_samples`` samples of each split (quick checks;
            ``limit_test_batches`` does not apply to this callback). None: the whole split.

    After a test run, ``self.results[split]`` holds ``mean``, ``se``, ``n``, ``num_repeats``,
    ``metric`` ('nll' or 'bpd'), ``nfe``, ``seconds`` and ``world_size`` (float64 values).
    """

    #: HOSMModule.test_step skips its own per-batch likelihood when a callback sets this
    computes_test_likelihood = True

    def __init__(
        self,
        num_repeats: int = 1,
        splits: list[str] | None = None,
        per_sample_path: str | None = None,
        batch_size: int | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        method: str = "dopri5",
        options: dict | None = None,
        divergence: str = "auto",
        seed: int | None = None,
        results_path: str | None = None,
        max_samples: int | None = None,
    ):
        super().__init__()
        splits = ["test"] if splits is None else list(splits)
        if int(num_repeats) < 1:
            raise ValueError(f"LikelihoodEvaluator.num_repeats must be >= 1, got {num_repeats!r}")
        if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
            raise ValueError(f"LikelihoodEvaluator.splits must be distinct names from {list(SPLITS)}, got {splits!r}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"LikelihoodEvaluator.batch_size must be >= 1 or None, got {batch_size!r}")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"LikelihoodEvaluator.{name} must be positive or None, got {tol!r}")
        if max_samples is not None and int(max_samples) < 1:
            raise ValueError(f"LikelihoodEvaluator.max_samples must be >= 1 or None, got {max_samples!r}")
        resolve_divergence(divergence, 1)
        self.max_samples = None if max_samples is None else int(max_samples)
        self.num_repeats, self.splits, self.per_sample_path = int(num_repeats), splits, per_sample_path
        self.batch_size = None if batch_size is None else int(batch_size)
        self.rtol, self.atol, self.method, self.divergence, self.seed = rtol, atol, method, divergence, seed
        self.options = dict(options) if options else None
        self.results_path = results_path
        #: split -> summary dict of the latest test run
        self.results: dict[str, dict] = {}

    # -- hook -----------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for split in self.splits:
            with torch.inference_mode(False):
                res = self.evaluate(trainer, pl_module, split)
            self._log(pl_module, split, res)

    # -- work -----------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict:
        """Evaluate one split on every rank; returns the same summary dict on every rank."""
        dataset, collate_fn, loader_bs = _split_dataset(trainer, split)
        if self.max_samples is not None and self.max_samples < len(dataset):
            dataset = Subset(dataset, range(self.max_samples))
        n = len(dataset)
        world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        indices = shard_indices(n, world, rank)
        bs = self.batch_size or loader_bs or 256
        loader = DataLoader(Subset(dataset, indices), batch_size=bs, shuffle=False, collate_fn=collate_fn, num_workers=0)
        device = pl_module.device
        seed = pl_module.seed if self.seed is None else self.seed
        values = torch.empty(len(indices), self.num_repeats, dtype=torch.float64)
        nfe_sum, solves, pos, start = 0.0, 0, 0, time.perf_counter()
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        metric = None
        for batch in _progress(loader, show, f"{split} likelihood ({self.num_repeats} repeat(s), rank 0)"):
            x = batch_tensor(batch).to(device)
            ids = indices[pos:pos + len(x)]
            for rep in range(self.num_repeats):
                val, nfe, metric = self._values(pl_module, x, ids, split, rep, seed)
                values[pos:pos + len(x), rep] = val.detach().double().cpu()
                nfe_sum, solves = nfe_sum + nfe, solves + 1
            pos += len(x)
        if pos != len(indices):
            raise RuntimeError(f"the {split} loader yielded {pos} samples, expected {len(indices)}")
        if metric is None:  # no local batch (cannot happen: DistributedSampler gives every rank >= 1 index)
            metric = "bpd" if _is_image_dataset(dataset) else "nll"
        # one collective per tensor, called by every rank the same number of times
        local = torch.cat([torch.tensor(indices, dtype=torch.float64)[:, None], values], 1).to(device)
        unique = gather_unique(trainer.strategy, local, n)
        stats = trainer.strategy.all_gather(torch.tensor([nfe_sum, float(solves)], dtype=torch.float64, device=device))
        stats = stats.reshape(-1, 2).sum(0).cpu()
        res = summarize(unique[:, 1:])
        res.update(split=split, metric=metric, nfe=(stats[0] / stats[1].clamp_min(1)).item(),
                   seconds=time.perf_counter() - start, world_size=world)
        entropy = getattr(getattr(trainer, "datamodule", None), "entropy", None)
        if metric == "nll" and entropy is not None:
            res["entropy"], res["gap"] = float(entropy), res["mean"] - float(entropy)
        self.results[split] = res
        if trainer.is_global_zero:
            self._write(split, unique, res)
        return res

    def _values(self, pl_module, x: Tensor, ids: list[int], split: str, rep: int, seed: int):
        """Per-sample NLL (nats) or bpd of one batch in one repeat, with per-sample noise."""
        image = x.dtype == torch.uint8
        dim = x[0].numel()
        mode = resolve_divergence(self.divergence, dim)
        gens = [make_generator(seed, "likelihood", split, rep, int(i), device=x.device) for i in ids]
        if image:  # uniform dequantization, then the model's scaling (DESIGN.md §4)
            y = torch.cat([dequantize(x[j:j + 1], g) for j, g in enumerate(gens)])
            centered = bool(getattr(pl_module, "data_centered", True))
            y = 2 * y - 1 if centered else y
        else:
            y = x if x.is_floating_point() else x.float()
        v = torch.cat([rademacher((1, *y.shape[1:]), y, g) for g in gens]) if mode == "hutchinson" else None
        ode = dict(getattr(pl_module, "ode_kwargs", {}))
        if self.rtol is not None:
            ode["rtol"] = self.rtol
        if self.atol is not None:
            ode["atol"] = self.atol
        logp, info = ode_log_likelihood(pl_module.score_model, pl_module.sde, y.contiguous(), method=self.method,
                                        divergence=mode, v=v, options=self.options, **ode)
        if image:
            return nats_to_bpd(logp, dim, centered), info["nfe"], "bpd"
        return -logp, info["nfe"], "nll"

    # -- output ---------------------------------------------------------------------------------
    def _log(self, pl_module, split: str, res: dict) -> None:
        # identical values on every rank: sync_dist averages equal numbers (and keeps Lightning's
        # distributed epoch-level logging check quiet)
        m = res["metric"]
        logs = {f"{split}/{m}": res["mean"], f"{split}/{m}_se": res["se"], f"{split}/nfe": res["nfe"],
                f"{split}/n": float(res["n"])}
        if "gap" in res:
            logs[f"{split}/nll_gap"] = res["gap"]
        for k, v in logs.items():
            pl_module.log(k, v, sync_dist=True)
        unit = "bits/dim" if m == "bpd" else "nats"
        rank_zero_info(
            f"{split} {m}: {res['mean']:.5f} ± {res['se']:.5f} {unit} (n={res['n']}, repeats={res['num_repeats']}, "
            f"mean NFE {res['nfe']:.0f}, {res['seconds']:.1f} s on {res['world_size']} rank(s))"
        )

    def _path(self, template: str, split: str) -> Path:
        if "{split}" in template:
            return Path(template.replace("{split}", split))
        path = Path(template)
        return path.with_name(f"{path.stem}_{split}{path.suffix}") if len(self.splits) > 1 else path

    def _write(self, split: str, unique: Tensor, res: dict) -> None:
        if self.per_sample_path:
            path = self._path(self.per_sample_path, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            idx, vals = unique[:, 0].long().numpy(), unique[:, 1:].numpy()
            if path.suffix == ".csv":
                with open(path, "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["index", *[f"{res['metric']}_rep{r}" for r in range(vals.shape[1])], "mean"])
                    for i, row in zip(idx, vals):
                        w.writerow([int(i), *[repr(float(v)) for v in row], repr(float(row.mean()))])
            else:
                np.savez(path, index=idx, value=vals, mean=vals.mean(1), metric=res["metric"], summary=json.dumps(res))
        if self.results_path:
            path = self._path(self.results_path, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2))


#: the name used in the issue; same class
BitsPerDim = LikelihoodEvaluator


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _is_image_dataset(dataset) -> bool:
    item = dataset[0]
    item = item[0] if isinstance(item, (list, tuple)) else item
    return isinstance(item, Tensor) and item.dtype == torch.uint8


def _split_dataset(trainer: L.Trainer, split: str):
    """(map-style dataset, collate_fn, batch_size) of a split, from the data module (or the
    trainer's own test loaders when there is no data module)."""
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        if split == "val":
            dm.setup("validate")  # the test stage only set up the test split
        loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    else:
        loaders = trainer.test_dataloaders if split == "test" else trainer.val_dataloaders
        if loaders is None:
            raise ValueError(f"LikelihoodEvaluator: no {split} data (pass a datamodule to trainer.test)")
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(f"LikelihoodEvaluator needs a map-style {split} dataset with a length "
                         f"(got {type(dataset).__name__})")
    if len(dataset) == 0:
        raise ValueError(f"the {split} dataset is empty")
    return dataset, getattr(loader, "collate_fn", None), getattr(loader, "batch_size", None)
