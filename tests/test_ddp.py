"""Distributed runs on CPU (gloo, loopback only): each point evaluated once, the same results on 1 and 2
processes, the ``likelihood`` command's own trainer, order-3 training and the non-finite guard under
DDP, and a 2-node CLI fit.

The test starts every rank itself (``LOCAL_RANK`` 0..W-1, or ``NODE_RANK`` for the two simulated
nodes), each in a new process group with a hard deadline (all groups are killed past it), on
127.0.0.1 with a free port. This file is also the worker script of the 2-process run:

    python tests/test_ddp.py <out dir>    # evaluation (validate, test, likelihood), then training
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import ROOT, clean_env, tiny_data, tiny_module, wait_all

from hosm_lightning.core.sde import VPSDE
from hosm_lightning.core.seeding import derive_seed
from hosm_lightning.data import DiscreteDataModule
from hosm_lightning.data.sharding import batch_index, shard_indices
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.lit.trainer import HOSMTrainer
from hosm_lightning.nets import SmallConvNet, ToyScoreNet
from hosm_lightning.options import EvalOptions

pytestmark = pytest.mark.slow

SUBPROCESS_TIMEOUT = 240
N_TEST, N_VAL = 7, 5  # not divisible by the world size 2
REPEATS, PROTOCOLS, K = 2, ["uniform", "truncated_normal"], 2
#: a fixed-step solver: each point's value does not depend on the batch it lands in, so 1 and 2
#: processes agree to float32 rounding (bit for bit on most CPUs); an adaptive solver's batch-wide
#: error control would only give agreement to about its tolerance (lit/evaluation.py)
RK4 = {"method": "rk4", "step_size": 0.25}
#: float32 rounding; other noise or another set of points moves the values by percents
SAME = {"rtol": 1e-6, "atol": 0.0}


# -- launching ranks ------------------------------------------------------------------------------
def _start(cmd: list[str], ranks: list[dict]) -> list[subprocess.Popen]:
    """One process per entry of ``ranks`` (that rank's extra environment) with a shared loopback rendezvous,
    each in its own process group."""
    env = clean_env()
    return [subprocess.Popen(cmd, cwd=ROOT, env={**env, **{k: str(v) for k, v in extra.items()}},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for extra in ranks]


def _succeeded(results: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    for code, out, err in results:
        assert code == 0, out[-3000:] + err[-5000:]
    return results


def _local_ranks(world: int = 2) -> list[dict]:
    """The environment of ``world`` processes on one node, launched externally (Lightning then starts none)."""
    return [{"LOCAL_RANK": r, "NODE_RANK": 0, "WORLD_SIZE": world} for r in range(world)]


def _trainer(out: Path, devices: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     callbacks=list(callbacks), default_root_dir=str(out), **kw)


# -- evaluation: each point once, the same numbers on 1 and 2 processes ----------------------------
class _Counting(HOSMModule):
    """Counts the likelihood evaluations of every (dataset index, protocol, repeat) in the test loop and the
    rows the network evaluates. The evaluation a point's noise belongs to is read off its generator: the
    noise of point i in repeat r is seeded by (seed, 'likelihood', split, r, i[, 'tn']) (lit/evaluation.py)."""

    def start_counting(self, n: int, protocols: list[str]) -> None:
        seed = self.fit_options.seed
        self.which = {derive_seed(seed, "likelihood", "test", r, i, *(("tn",) if p == "truncated_normal" else ())):
                      (i, p, r) for i in range(n) for r in range(REPEATS) for p in protocols}
        self.counts, self.mismatches, self.net_rows, self.inside = Counter(), [], 0, False
        self.net.register_forward_hook(self._count_rows)

    def _count_rows(self, net, inputs, output) -> None:
        self.net_rows += int(inputs[0].shape[0])

    def test_step(self, batch, batch_idx):
        self.batch_ids = batch_index(batch).tolist()
        return super().test_step(batch, batch_idx)

    def _record(self, generators, protocol: str) -> None:
        keys = [self.which.get(g.initial_seed(), (None, None, None)) for g in generators]
        if len(keys) != len(self.batch_ids):
            self.mismatches.append(["generators for", len(keys), "points of", len(self.batch_ids)])
        for point, key in zip(self.batch_ids, keys):  # a point evaluated with the noise of another point/protocol
            if key[:2] != (point, protocol):
                self.mismatches.append([point, protocol, *key])
        self.counts.update(keys)

    def bits_per_dim(self, k, generator=None, protocol="uniform", num_importance=1, ode=None):
        self._record(generator, protocol)
        self.inside = True
        try:
            return super().bits_per_dim(k, generator, protocol, num_importance, ode)
        finally:
            self.inside = False

    def log_likelihood(self, x, generator=None, ode=None):
        if not self.inside:  # a float-data evaluation (bits/dim calls this for its dequantized points)
            self._record(generator, "nll")
        return super().log_likelihood(x, generator, ode)


def _counting_module(image: bool) -> _Counting:
    torch.manual_seed(0)  # the same (untrained) weights in every process
    net = SmallConvNet(image_channels=3, image_size=8, channels=4, depth=1) if image else \
        ToyScoreNet(dim=1, encoder_width=16, embed_dim=8, decoder_width=32)
    evaluation = EvalOptions(num_repeats=REPEATS, dequantization=PROTOCOLS, num_importance=K, ode=RK4)
    module = _Counting(net, sde=VPSDE(), evaluation=evaluation)
    module.start_counting(N_TEST, PROTOCOLS if image else ["nll"])
    return module


class _SeenIndices(L.Callback):
    def __init__(self):
        self.val = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val += batch_index(batch).tolist()


def _evaluate(out: Path, devices: int) -> dict:
    """validate (float data, val likelihood) and test (8-bit images: bits/dim by both protocols; float data:
    NLL) with counting modules; this rank's record, also written to ``eval_<devices>_rank<r>.json``."""
    record = {}
    seen = _SeenIndices()
    trainer = _trainer(out, devices, [seen])
    module = tiny_module(1, ode=RK4)
    metrics = trainer.validate(module, datamodule=tiny_data(val_size=N_VAL, batch_size=2), verbose=False)[0]
    record["val"] = {"indices": seen.val, "nll": metrics["val/nll"]}
    for name, dm in (("bpd", DiscreteDataModule(shape="image", test_size=N_TEST, eval_batch_size=3)),
                     ("nll", tiny_data(test_size=N_TEST, batch_size=3))):
        module = _counting_module(image=name == "bpd")
        trainer = _trainer(out, devices)
        logged = trainer.test(module, datamodule=dm, verbose=False)[0]
        res = module.test_results
        record[name] = {
            "counts": [[*k, n] for k, n in module.counts.items()], "mismatches": module.mismatches,
            "net_rows": module.net_rows,
            "logged": {k: float(v) for k, v in logged.items()}, "n": res["n"], "world_size": res["world_size"],
            "per_sample": {k: v.tolist() for k, v in res["per_sample"].items()},
        }
    # the `likelihood` command (its own evaluation trainer) on the validation split
    command = HOSMTrainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, default_root_dir=str(out))
    res = command.likelihood(tiny_module(1, ode=RK4), tiny_data(val_size=N_VAL, batch_size=2), split="val",
                             num_repeats=REPEATS, out_dir=str(out / f"likelihood_{devices}"))
    record["likelihood"] = {k: res[k] for k in ("n", "world_size", "split", "num_repeats", "mean")}
    record["likelihood"]["per_sample"] = {k: v.tolist() for k, v in res["per_sample"].items()}
    record["rank"], record["world_size"] = trainer.global_rank, trainer.world_size
    (out / f"eval_{devices}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process worker (evaluation, then training) and, meanwhile, the same evaluation in this process
    on 1 device with 1 thread like the workers: (out dir, 1-process record, worker results, seconds)."""
    out = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    procs = _start([sys.executable, __file__, str(out)], _local_ranks())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _evaluate(out, 1)
    finally:
        torch.set_num_threads(threads)
    results = wait_all(procs)
    return out, one, results, time.monotonic() - start


def _worker_file(runs, name: str) -> Path:
    """A file the 2-process worker writes; a failure shows the worker's output if it is missing."""
    out, _, results, _ = runs
    path = out / name
    if not path.is_file():
        logs = "\n".join(f"rank {r}: exit {code}\n{o[-2000:]}\n{e[-4000:]}" for r, (code, o, e) in enumerate(results))
        pytest.fail(f"the 2-process worker wrote no {name}\n{logs}")
    return path


@pytest.fixture(scope="module")
def evaluations(runs):
    """The evaluation records of 1 process and of the 2 ranks of the 2-process run."""
    two = [json.loads(_worker_file(runs, f"eval_2_rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in two] == [0, 1] and [r["world_size"] for r in two] == [2, 2]
    return runs[1], two


def _counts(records: list[dict], name: str) -> Counter:
    total = Counter()
    for rec in records:
        total.update({(i, p, r): n for i, p, r, n in rec[name]["counts"]})
    return total


@pytest.mark.parametrize("name", ["bpd", "nll"])
def test_each_test_point_is_evaluated_once_per_protocol_and_repeat_on_one_and_two_processes(evaluations, name):
    one, two = evaluations
    protocols = PROTOCOLS if name == "bpd" else ["nll"]
    expected = Counter({(i, p, r): 1 for i in range(N_TEST) for p in protocols for r in range(REPEATS)})
    for rec in (one, *two):
        assert rec[name]["mismatches"] == [], "points evaluated with the noise of another point or protocol"
    assert _counts([one], name) == expected
    assert _counts(two, name) == expected
    for rank, rec in enumerate(two):  # the ranks split the points: rank r took r, r + 2, ...
        assert sorted({i for i, *_ in rec[name]["counts"]}) == list(shard_indices(N_TEST, 2, rank))
    # the network saw as many rows in total on 2 processes as on 1: nothing evaluated twice or left out
    assert sum(rec[name]["net_rows"] for rec in two) == one[name]["net_rows"] > 0
    for rec in (one, *two):
        assert rec[name]["n"] == N_TEST and rec[name]["per_sample"]["index"] == list(range(N_TEST))
        assert rec[name]["logged"]["test/n"] == N_TEST


def test_two_processes_give_the_same_test_bits_per_dim_as_one(evaluations):
    """8-bit images, both dequantization protocols, 2 repeats, K = 2: every point's value, the means and
    the logged metrics are identical (a fixed-step solver; per-point noise seeded by the point's index)."""
    one, two = evaluations
    a, b = one["bpd"], two[0]["bpd"]
    assert b["world_size"] == 2 and a["world_size"] == 1
    for p in PROTOCOLS:
        assert np.shape(a["per_sample"][p]) == (N_TEST, REPEATS)
        np.testing.assert_allclose(b["per_sample"][p], a["per_sample"][p], **SAME, err_msg=p)
        assert b["per_sample"][p] == two[1]["bpd"]["per_sample"][p]  # every rank holds the same gathered rows
    for tag in [f"test/bpd_{t}{s}" for t in ("uniform", "tn") for s in ("", "_se")]:
        np.testing.assert_allclose(b["logged"][tag], a["logged"][tag], **SAME, err_msg=tag)
        assert b["logged"][tag] == two[1]["bpd"]["logged"][tag], tag
    # the two protocols used different noise and give different numbers
    assert abs(a["logged"]["test/bpd_tn"] - a["logged"]["test/bpd_uniform"]) > 1e-3
    # the repeats used fresh noise
    assert all(row[0] != row[1] for row in a["per_sample"]["uniform"])


def test_two_processes_give_the_same_test_nll_as_one(evaluations):
    one, two = evaluations
    a = one["nll"]
    assert np.shape(a["per_sample"]["nll"]) == (N_TEST, REPEATS)
    for rec in two:
        np.testing.assert_allclose(rec["nll"]["per_sample"]["nll"], a["per_sample"]["nll"], **SAME)
        for tag in ("test/nll", "test/nll_se", "test/kl"):
            np.testing.assert_allclose(rec["nll"]["logged"][tag], a["logged"][tag], **SAME, err_msg=tag)


def test_validation_counts_each_point_once_under_ddp(evaluations):
    """val/nll of 5 points (not divisible by 2) on 2 processes equals the 1-process value: no padded point
    counted twice, and the ranks' means weighted by the number of points each evaluated."""
    one, two = evaluations
    assert sorted(one["val"]["indices"]) == list(range(N_VAL))
    assert sorted(two[0]["val"]["indices"] + two[1]["val"]["indices"]) == list(range(N_VAL))
    for rank, rec in enumerate(two):
        assert rec["val"]["indices"] == list(shard_indices(N_VAL, 2, rank))
        assert rec["val"]["nll"] == pytest.approx(one["val"]["nll"], rel=1e-6, abs=1e-6)
    # the mean a padded shard would give (point 0 twice) is far outside that tolerance
    module = tiny_module(1, ode=RK4)
    dm = tiny_data(val_size=N_VAL)
    dm.setup()
    val = torch.stack([row["x"] for row in dm.val_dataloader().dataset])
    with torch.enable_grad():
        nll = -module.log_likelihood(val).logp.double()
    assert float(nll.mean()) == pytest.approx(one["val"]["nll"], rel=1e-5)
    assert abs(float(torch.cat([nll, nll[:1]]).mean()) - one["val"]["nll"]) > 1e-3


def test_likelihood_command_evaluates_each_val_point_once_on_two_processes(evaluations, runs):
    """``HOSMTrainer.likelihood`` (the CLI's `likelihood`) on 2 processes: its own DDP trainer evaluates every
    validation point once per repeat, the same values as on 1 process; rank 0 writes the files."""
    one, two = evaluations
    a = one["likelihood"]
    assert a["split"] == "val" and a["n"] == N_VAL and a["world_size"] == 1 and a["num_repeats"] == REPEATS
    # the likelihood command's val split is the validation loop's (1-D data: exact divergence, no noise)
    assert a["mean"] == pytest.approx(one["val"]["nll"], rel=1e-5)
    for rec in two:
        b = rec["likelihood"]
        assert b["split"] == "val" and b["n"] == N_VAL and b["world_size"] == 2 and b["num_repeats"] == REPEATS
        assert b["per_sample"]["index"] == list(range(N_VAL))
        np.testing.assert_allclose(b["per_sample"]["nll"], a["per_sample"]["nll"], **SAME)
    written = json.loads(_worker_file(runs, "likelihood_2/val_nll.json").read_text())
    assert written["n"] == N_VAL and written["world_size"] == 2 and written["mean"] == two[0]["likelihood"]["mean"]
    per = np.load(_worker_file(runs, "likelihood_2/val_per_sample.npz"))
    assert per["index"].tolist() == list(range(N_VAL)) and per["value"].shape == (N_VAL, REPEATS)


# -- training under DDP: order 3, and a NaN on one rank -----------------------------------------------
class _NaNNet(ToyScoreNet):
    """A toy net whose output turns NaN while ``broken`` is set."""

    broken = False

    def forward(self, x, t, sigma=None):
        out = super().forward(x, t)
        return out * float("nan") if self.broken else out


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class _BreakRank1(L.Callback):
    """NaN network output on rank 1 only, in the step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.net.broken = trainer.global_rank == 1 and trainer.global_step == self.at


def _train(out: Path) -> None:
    """3 order-3 steps per divergence (weights and losses per rank to files), then a run whose rank 1 gets a
    NaN at step 3 (each rank writes the FloatingPointError it stopped with)."""
    for divergence, name, dim in (("hutchinson", "checkerboard", 2), ("exact", "mog1d", 1)):
        L.seed_everything(0, verbose=False)
        model = tiny_module(dim, stages=[{"order": 3}], objective={"divergence": divergence})
        init = {k: v.clone() for k, v in model.state_dict().items()}
        rec = _Losses()
        trainer = _trainer(out, 2, [rec], max_steps=3, limit_val_batches=0)
        trainer.fit(model, tiny_data(name, batch_size=16))
        rank = trainer.global_rank
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, out / f"{divergence}_rank{rank}.pt")
        changed = any(not torch.equal(state[k], init[k]) for k in init)
        (out / f"{divergence}_rank{rank}.json").write_text(json.dumps(
            {"losses": rec.losses, "step": trainer.global_step, "changed": changed,
             "order": model.current_stage()[1].order}))
    torch.manual_seed(0)
    model = tiny_module(1, net=_NaNNet(dim=1, encoder_width=16, embed_dim=8, decoder_width=32),
                        stages=[{"order": 1, "steps": 4}, {"order": 2}], fit={"val_likelihood": False})
    trainer = _trainer(out, 2, [_BreakRank1(at=3)], max_steps=8, limit_val_batches=0, gradient_clip_val=1.0)
    try:
        trainer.fit(model, tiny_data(batch_size=16, steps_per_epoch=20))
    except FloatingPointError as err:
        (out / f"nan_rank{trainer.global_rank}.txt").write_text(str(err))


def test_ddp_order3_training_keeps_ranks_identical(runs):
    for divergence in ("hutchinson", "exact"):
        recs = [json.loads(_worker_file(runs, f"{divergence}_rank{r}.json").read_text()) for r in range(2)]
        states = [torch.load(_worker_file(runs, f"{divergence}_rank{r}.pt"), weights_only=True) for r in range(2)]
        for rec in recs:
            assert rec["step"] == 3 and rec["order"] == 3 and rec["changed"]
            assert len(rec["losses"]) == 3 and all(abs(v) < float("inf") for v in rec["losses"])
        # per-rank data and noise (t, z, v): the local losses differ between ranks ...
        assert recs[0]["losses"] != recs[1]["losses"]
        # ... but DDP averaged the gradients, so the weights are bit-identical afterwards
        assert states[0].keys() == states[1].keys()
        for k in states[0]:
            assert torch.equal(states[0][k], states[1][k]), (divergence, k)


def test_nan_on_one_ddp_rank_stops_both_ranks(runs):
    """A NaN in the network output of rank 1 only, at step 3: both ranks stop with the same error within
    the deadline (a per-rank check would leave rank 0 waiting in the gradient all-reduce)."""
    messages = [_worker_file(runs, f"nan_rank{r}.txt").read_text() for r in (0, 1)]
    assert "non-finite gradients at step 3" in messages[0]
    assert messages[0].split(":")[0] == messages[1].split(":")[0]  # same step, same stage, both ranks
    assert "dsm" in messages[1]  # the rank with the NaN batch names the term
    _succeeded(runs[2])  # and both processes then ended normally, within the deadline


# -- two simulated nodes x one process through the CLI ----------------------------------------------
def _two_node_config(tmp: Path) -> Path:
    import yaml

    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "num_nodes": 2, "strategy": "ddp", "max_steps": 4,
            "val_check_interval": 4, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp / "tb"), "name": "two_nodes"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_last": True, "every_n_train_steps": 2}},
                {"class_path": "hosm_lightning.lit.callbacks.DensityPlotCallback",
                 "init_args": {"grid_size": 20, "num_samples": 16, "ode": {"rtol": 1e-3, "atol": 1e-3}}},
            ],
        },
        "model": {
            "net": {"class_path": "hosm_lightning.nets.ToyScoreNet",
                    "init_args": {"dim": 1, "encoder_width": 16, "embed_dim": 8, "decoder_width": 32}},
            "stages": [{"order": 1, "steps": 2}, {"order": 2}],
            "objective": {"lambda2": 0.5, "divergence": "exact"}, "ode": {"rtol": 1e-3, "atol": 1e-3},
            "evaluation": {"num_repeats": 2},
        },
        "data": {"class_path": "hosm_lightning.data.SyntheticDataModule",
                 "init_args": {"name": "mog1d", "batch_size": 32, "steps_per_epoch": 4, "val_size": N_VAL,
                               "test_size": N_TEST}},
    }
    path = tmp / "two_nodes.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two_nodes(args: list[str]) -> list[tuple[int, str, str]]:
    """Node 0 and node 1 (one process each), launched by hand as on two machines: NODE_RANK, LOCAL_RANK
    (its presence tells Lightning the processes are launched externally) and WORLD_SIZE; Lightning derives
    the global rank NODE_RANK * devices + LOCAL_RANK."""
    return _succeeded(wait_all(_start([sys.executable, str(ROOT / "cli.py"), *args],
                                   [{"NODE_RANK": node, "LOCAL_RANK": 0, "WORLD_SIZE": 2} for node in (0, 1)])))


def test_two_nodes_cli_fit_writes_finite_ema_checkpoints_and_plots(tmp_path):
    """fit on 2 nodes x 1 process through the CLI, with the weight average, checkpoints, validation
    likelihood and density plots (made on rank 0 only) in one run: both nodes finish within the deadline."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = _two_nodes(["fit", "--config", str(_two_node_config(tmp_path))])
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    # the checkpoint's weights are the average; the raw weights are kept beside them
    raw = ckpt["current_model_state"]
    assert any(not torch.equal(v, raw[k]) for k, v in ckpt["state_dict"].items() if k in raw and v.is_floating_point())
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and list((tmp_path / "tb").rglob("density_latest.png"))  # rank 0 only: one file
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"train/loss", "val/nll", "val/loss"} <= set(acc.Tags()["scalars"])
    assert "last checkpoint" in results[0][1]


if __name__ == "__main__":
    torch.set_num_threads(1)
    _evaluate(Path(sys.argv[1]), int(os.environ["WORLD_SIZE"]))
    _train(Path(sys.argv[1]))
