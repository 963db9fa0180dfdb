"""Exact ODE likelihood of a whole data split at test time, correct under DDP (docs/design.md §4, §7).

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
* **Weights and module.** The callback goes through the module's one likelihood path,
  ``pl_module.log_likelihood`` (float data) and ``pl_module.bits_per_dim`` (uint8 data), with the
  module's ODE options (``model.ode``) and this callback's ``ode`` overrides. Both run the unwrapped
  score network, never the DDP wrapper: an adaptive solver takes a different number of steps on each
  rank, so a wrapped forward would hang. At test time the module holds the weights of the
  checkpoint's ``state_dict``, which are the EMA weights when weight averaging was on. The same holds
  right after ``fit`` in the same process, because ``on_train_end`` copies the average into the module.

* **Dequantization protocols** (uint8 data, core/dequantization.py): ``uniform`` (the paper's
  y = (k + u)/256) and/or ``truncated_normal`` (i-DODE: x_eps = a x̄ + σ n, n a normal truncated to
  the bin), each with ``num_importance`` = K importance samples per datum (log-mean-exp bound).
  Each protocol has its own per-sample noise (uniform: (seed, 'likelihood', split, r, i), the
  key used before protocols existed; truncated normal: the same key plus 'tn').

Logged (once per split, the same value on every rank): ``<split>/nll`` and ``<split>/nll_se``
(nats, low-D data), or, for uint8 images, ``<split>/bpd_uniform`` / ``<split>/bpd_tn`` with
``_se`` and ``<split>/nfe_uniform`` / ``<split>/nfe_tn`` per protocol (bits/dim), and
``<split>/bpd``, ``<split>/bpd_se`` = the uniform value (backward compatible; absent when only
the truncated normal is evaluated); also ``<split>/nfe`` (mean score evaluations per ODE solve),
``<split>/n``, ``<split>/nll_gap`` when the data module knows its entropy, and ``<split>/kl``,
``<split>/kl_se`` when it knows its exact density (``DataSpec.log_prob``: the mixtures and the
checkerboard): the mean over the same points of log q0(x) − log p(x) in nats, with the standard
error of the per-point difference (much smaller than that of the NLL itself). Rank 0 can also
write the per-sample values to a .npz or .csv file.
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

from ..core.dequantization import TAGS, resolve_protocol
from ..core.ode_options import ODEOptions
from ..core.seeding import make_generator
from ..data.spec import describe
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
        ode: overrides of the model's ODE options (``model.ode``) for this evaluation, e.g.
            ``{rtol: 1.0e-3}`` or ``{method: rk4, step_size: 0.01}`` (fixed-step solvers give
            per-sample values that do not depend on the batch composition at all). Default: none.
        seed: base seed of the per-sample noise (default: the module's ``fit.seed``).
        results_path: rank 0 also writes a JSON summary per split here (``{split}`` as above).
        max_samples: evaluate only the first ``max_samples`` samples of each split (quick checks;
            ``limit_test_batches`` does not apply to this callback). None: the whole split.
        dequantization: uint8 data only: 'uniform' (paper protocol), 'truncated_normal' (i-DODE,
            training-free; alias 'tn') or a list of both (each is evaluated and logged).
        num_importance: K importance samples per datum and repeat for the bits/dim bound
            (log (1/K) Σ exp(log p − log q)); K model evaluations each. Default 1.

    After a test run, ``self.results[split]`` holds ``mean``, ``se``, ``n``, ``num_repeats``,
    ``metric`` ('nll' or 'bpd'), ``nfe``, ``seconds`` and ``world_size`` (float64 values); for
    bits/dim also ``dequantization`` (the protocol of ``mean``: uniform when evaluated),
    ``num_importance`` and ``protocols`` ({protocol: {mean, se, nfe, tag, ...}}); ``kl``/``kl_se``
    when the data's exact density is known.
    """

    def __init__(
        self,
        num_repeats: int = 1,
        splits: list[str] | None = None,
        per_sample_path: str | None = None,
        batch_size: int | None = None,
        ode: dict | None = None,
        seed: int | None = None,
        results_path: str | None = None,
        max_samples: int | None = None,
        dequantization: str | list[str] = "uniform",
        num_importance: int = 1,
    ):
        super().__init__()
        splits = ["test"] if splits is None else list(splits)
        if int(num_repeats) < 1:
            raise ValueError(f"LikelihoodEvaluator.num_repeats must be >= 1, got {num_repeats!r}")
        if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
            raise ValueError(f"LikelihoodEvaluator.splits must be distinct names from {list(SPLITS)}, got {splits!r}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"LikelihoodEvaluator.batch_size must be >= 1 or None, got {batch_size!r}")
        self.ode = dict(ode or {})
        ODEOptions().replace(**self.ode)  # unknown keys or bad values fail here, not at test time
        if max_samples is not None and int(max_samples) < 1:
            raise ValueError(f"LikelihoodEvaluator.max_samples must be >= 1 or None, got {max_samples!r}")
        self.protocols = parse_protocols(dequantization)
        if int(num_importance) != num_importance or int(num_importance) < 1:
            raise ValueError(f"LikelihoodEvaluator.num_importance must be an integer >= 1, got {num_importance!r}")
        self.num_importance = int(num_importance)
        self.max_samples = None if max_samples is None else int(max_samples)
        self.num_repeats, self.splits, self.per_sample_path = int(num_repeats), splits, per_sample_path
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seed = seed
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
        seed = pl_module.fit_options.seed if self.seed is None else self.seed
        ode = pl_module.ode.replace(**self.ode)
        image = _is_image_dataset(dataset)
        protocols = self.protocols if image else [None]
        values = {p: torch.empty(len(indices), self.num_repeats, dtype=torch.float64) for p in protocols}
        nfe = {p: [0.0, 0] for p in protocols}
        pos, start = 0, time.perf_counter()
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        for batch in _progress(loader, show, f"{split} likelihood ({self.num_repeats} repeat(s), rank 0)"):
            x = batch_tensor(batch).to(device)
            ids = indices[pos:pos + len(x)]
            for rep in range(self.num_repeats):
                for p in protocols:
                    val, nfe_p = self._values(pl_module, x, ids, (seed, "likelihood", split, rep), p, ode)
                    values[p][pos:pos + len(x), rep] = val.detach().double().cpu()
                    nfe[p][0] += nfe_p
                    nfe[p][1] += 1
            pos += len(x)
        if pos != len(indices):
            raise RuntimeError(f"the {split} loader yielded {pos} samples, expected {len(indices)}")
        metric = "bpd" if image else "nll"
        # one collective per tensor, called by every rank the same number of times
        cols = [torch.tensor(indices, dtype=torch.float64)[:, None]] + [values[p] for p in protocols]
        unique = gather_unique(trainer.strategy, torch.cat(cols, 1).to(device), n)
        stats = torch.tensor([v for p in protocols for v in nfe[p]], dtype=torch.float64, device=device)
        stats = trainer.strategy.all_gather(stats).reshape(-1, 2 * len(protocols)).sum(0).cpu()
        r = self.num_repeats
        per = {p: unique[:, 1 + q * r:1 + (q + 1) * r] for q, p in enumerate(protocols)}
        spec = describe(trainer.datamodule)
        summaries = {}
        for q, p in enumerate(protocols):
            summ = summarize(per[p])
            summ["nfe"] = (stats[2 * q] / stats[2 * q + 1].clamp_min(1)).item()
            summaries[p] = summ
        primary = "uniform" if "uniform" in protocols else protocols[0]
        res = dict(summaries[primary])
        res.update(split=split, metric=metric, seconds=time.perf_counter() - start, world_size=world)
        entropy = spec.entropy
        if metric == "nll":
            if entropy is not None:
                res["entropy"], res["gap"] = float(entropy), res["mean"] - float(entropy)
            res.update(_kl(spec, dataset, per[None]))
        else:
            res.update(dequantization=primary, num_importance=self.num_importance, protocols={})
            exact = _exact_bits(spec, dataset)
            for p in protocols:
                entry = {**summaries[p], "tag": TAGS[p], "num_importance": self.num_importance}
                if exact is not None:  # bits/dim minus the exact −log2 P(k)/D, paired per sample
                    diff = per[p].double().mean(1) - exact
                    entry["gap"] = diff.mean().item()
                    entry["gap_se"] = (diff.std() / math.sqrt(n)).item() if n > 1 else float("nan")
                res["protocols"][p] = entry
            if entropy is not None:
                res["entropy"] = float(entropy)
        self.results[split] = res
        if trainer.is_global_zero:
            self._write(split, unique, res, protocols)
        return res

    def _values(self, pl_module, x: Tensor, ids: list[int], key: tuple, protocol: str | None, ode) -> tuple:
        """Per-sample NLL (nats) or bpd of one batch in one repeat with one protocol, through the module's
        likelihood path; sample i's noise comes from its own generator (*key, i) (truncated normal: + 'tn')."""
        extra = () if protocol in (None, "uniform") else ("tn",)
        gens = [make_generator(*key, int(i), *extra, device=x.device) for i in ids]
        if protocol is None:  # low-D float data: NLL in nats
            logp, info = pl_module.log_likelihood(x if x.is_floating_point() else x.float(), gens, ode)
            return -logp, info["nfe"]
        bpd, info = pl_module.bits_per_dim(x, gens, protocol=protocol, num_importance=self.num_importance, ode=ode)
        return bpd, info["nfe"]

    # -- output ---------------------------------------------------------------------------------
    def _log(self, pl_module, split: str, res: dict) -> None:
        # identical values on every rank: sync_dist averages equal numbers (and keeps Lightning's
        # distributed epoch-level logging check quiet)
        m = res["metric"]
        logs = {f"{split}/nfe": res["nfe"], f"{split}/n": float(res["n"])}
        if m == "nll":
            logs.update({f"{split}/nll": res["mean"], f"{split}/nll_se": res["se"]})
        for p, e in res.get("protocols", {}).items():
            logs.update({f"{split}/bpd_{e['tag']}": e["mean"], f"{split}/bpd_{e['tag']}_se": e["se"],
                         f"{split}/nfe_{e['tag']}": e["nfe"]})
            if "gap" in e:
                logs[f"{split}/bpd_{e['tag']}_gap"] = e["gap"]
            if p == "uniform":  # backward compatible: test/bpd is the uniform protocol
                logs.update({f"{split}/bpd": e["mean"], f"{split}/bpd_se": e["se"]})
        if "gap" in res:
            logs[f"{split}/nll_gap"] = res["gap"]
        if "kl" in res:
            logs.update({f"{split}/kl": res["kl"], f"{split}/kl_se": res["kl_se"]})
        for k, v in logs.items():
            pl_module.log(k, v, sync_dist=True)
        where = f"(n={res['n']}, repeats={res['num_repeats']}, {res['seconds']:.1f} s on {res['world_size']} rank(s))"
        if m == "nll":
            kl = f", KL {res['kl']:.5f} ± {res['kl_se']:.5f}" if "kl" in res else ""
            rank_zero_info(f"{split} nll: {res['mean']:.5f} ± {res['se']:.5f} nats{kl} (mean NFE {res['nfe']:.0f}) {where}")
        for p, e in res.get("protocols", {}).items():
            rank_zero_info(f"{split} bpd ({p}, K={e['num_importance']}): {e['mean']:.5f} ± {e['se']:.5f} bits/dim "
                           f"(mean NFE {e['nfe']:.0f}) {where}")

    def _path(self, template: str, split: str) -> Path:
        if "{split}" in template:
            return Path(template.replace("{split}", split))
        path = Path(template)
        return path.with_name(f"{path.stem}_{split}{path.suffix}") if len(self.splits) > 1 else path

    def _write(self, split: str, unique: Tensor, res: dict, protocols: list) -> None:
        r = self.num_repeats
        idx = unique[:, 0].long().numpy()
        blocks = {p: unique[:, 1 + q * r:1 + (q + 1) * r].numpy() for q, p in enumerate(protocols)}
        primary = res.get("dequantization")
        if self.per_sample_path:
            path = self._path(self.per_sample_path, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            single = len(protocols) == 1
            names = {p: res["metric"] if single else f"{res['metric']}_{TAGS[p]}" for p in protocols}
            if path.suffix == ".csv":
                with open(path, "w", newline="") as fh:
                    w = csv.writer(fh)
                    head = ["index"]
                    for p in protocols:
                        head += [f"{names[p]}_rep{j}" for j in range(r)] + (["mean"] if single else [f"{names[p]}_mean"])
                    w.writerow(head)
                    for row_i, i in enumerate(idx):
                        row = [int(i)]
                        for p in protocols:
                            vals = blocks[p][row_i]
                            row += [repr(float(v)) for v in vals] + [repr(float(vals.mean()))]
                        w.writerow(row)
            else:
                main = blocks[primary if primary in blocks else protocols[0]]
                extra = {} if single else {f"value_{TAGS[p]}": blocks[p] for p in protocols}
                np.savez(path, index=idx, value=main, mean=main.mean(1), metric=res["metric"], summary=json.dumps(res),
                         **extra)
        if self.results_path:
            path = self._path(self.results_path, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2))


def parse_protocols(value) -> list[str]:
    """'uniform' | 'truncated_normal' | 'tn' | 'uniform,tn' | '[uniform, tn]' | a list -> canonical names."""
    if isinstance(value, str):
        value = [v for v in value.strip().strip("[]").replace(" ", "").split(",") if v]
    out = [resolve_protocol(v) for v in (value or [])]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"dequantization must name 'uniform' and/or 'truncated_normal' once each, got {value!r}")
    return out


def _points(dataset) -> Tensor:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it[0] if isinstance(it, (list, tuple)) else it for it in items])


def _kl(spec, dataset, nll: Tensor) -> dict:
    """{'kl', 'kl_se'}: mean and s.e. over points of log q0(x) − log p(x) (nats), if q0 is known exactly."""
    if spec.log_prob is None:
        return {}
    x = _points(dataset).double()
    logq0 = spec.log_prob(x.reshape(len(x), -1))
    diff = logq0.double().cpu() + nll.double().mean(1)
    n = len(diff)
    return {"kl": diff.mean().item(), "kl_se": (diff.std() / math.sqrt(n)).item() if n > 1 else float("nan")}


def _exact_bits(spec, dataset) -> Tensor | None:
    """Per-sample −log2 P(k)/D of uint8 data whose distribution is known exactly (discrete data), or None."""
    if spec.log_prob_bytes is None:
        return None
    k = _points(dataset)
    return -spec.log_prob_bytes(k).double() / (k[0].numel() * math.log(2))


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
    dm = trainer.datamodule
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
