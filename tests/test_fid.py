"""FIDCallback: real-statistics cache, per-sample seeds, agreement with torch-fidelity, DDP, weights error.

Everything runs on a fake CIFAR-10 folder with a tiny random-projection feature extractor, so no
Inception weights (and no network) are needed. The same extractor is registered with
torch-fidelity's feature-extractor registry, so ``torch_fidelity.calculate_metrics`` on the
written PNG folders is an independent cross-check of the number.

This file is also the worker script of the two-process test (one process per rank, started by the test):
``python tests/test_fid.py <state_dict> <cifar root> <out dir>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import ROOT, clean_env, wait_all
from torch import nn

from hosm_lightning.core.sde import VPSDE
from hosm_lightning.data import CIFAR10DataModule, read_cifar10, write_fake_cifar10
from hosm_lightning.data.sharding import shard_indices
from hosm_lightning.inception import INCEPTION_WEIGHTS_FILE
from hosm_lightning.lit.fid import FIDCallback
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.nets import SmallConvNet
from hosm_lightning.options import EvalOptions

N_SAMPLES, N_TRAIN, DIM = 12, 40, 6
#: fixed-step sampler: per-sample results do not depend on the batch composition at all
RK4 = {"ode": {"method": "rk4", "step_size": 0.25}}
#: the test loop runs for FID only (no per-point bits/dim)
FID_ONLY = EvalOptions(max_samples=0)
SUBPROCESS_TIMEOUT = 240


class TinyFeatures(nn.Module):
    """uint8 [N, 3, H, W] -> [N, DIM]: 4x4 average pooling, a fixed random projection, tanh.
    ``images_seen`` counts the images it has embedded."""

    num_features = DIM
    fid_key = "tests.TinyFeatures-v1"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, DIM, generator=g, dtype=torch.float64) / 4)
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8, x.dtype
        self.images_seen += len(x)
        h = nn.functional.adaptive_avg_pool2d(x.double() / 255, 4).flatten(1)
        return torch.tanh(3 * (h - 0.5) @ self.proj).float()


def _register_with_torch_fidelity() -> str:
    """Register TinyFeatures as a torch-fidelity feature extractor (its registry API); returns the name."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    name = "hosm-tests-tiny"

    class TinyFidelityExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = TinyFeatures()

        @staticmethod
        def get_provided_features_list():
            return ("tiny",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "tiny"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            return (self.net(x),)

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, TinyFidelityExtractor)
    return name


def _model(state_dict_path: str | Path | None = None, cls=HOSMModule) -> HOSMModule:
    torch.manual_seed(0)
    model = cls(SmallConvNet(channels=8, depth=1), sde=VPSDE(), evaluation=FID_ONLY)
    if state_dict_path is not None:
        model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return model


def _datamodule(root: Path) -> CIFAR10DataModule:
    return CIFAR10DataModule(str(root), batch_size=4, eval_batch_size=4, num_workers=0, val_size=4)


def _fid(features: nn.Module | None = None, **kw) -> FIDCallback:
    return FIDCallback(**{"num_samples": N_SAMPLES, "batch_size": 5, "feature_module": features or TinyFeatures(),
                          "seed": 7, "grid_size": 9, **RK4, **kw})


def _run_test(tmp: Path, root: Path, state: Path, **cb_kw) -> tuple[FIDCallback, dict]:
    from lightning.pytorch.loggers import TensorBoardLogger

    cb = _fid(**cb_kw)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp / "tb"), name="fid"),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=str(tmp))
    metrics = trainer.test(_model(state), _datamodule(root), verbose=False)[0]
    return cb, {**metrics, "log_dir": trainer.log_dir}


def _frechet_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Independent Fréchet distance of two feature sets (scipy sqrtm)."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _read_pngs(folder: Path) -> torch.Tensor:
    from PIL import Image

    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in sorted(folder.glob("*.png"))])


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid")
    write_fake_cifar10(tmp / "cifar", n_train=N_TRAIN, n_test=4)
    state = tmp / "state.pt"
    torch.save(_model().state_dict(), state)
    return tmp, tmp / "cifar", state


@pytest.fixture(scope="module")
def first_run(setup_dir):
    tmp, root, state = setup_dir
    with pytest.warns(UserWarning, match="not comparable"):
        cb, metrics = _run_test(tmp / "run1", root, state, real_stats_cache=str(tmp / "stats.pt"),
                                png_dir=str(tmp / "run1" / "png"))
    return cb, metrics


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_logs_fid_and_writes_cache_and_pngs(setup_dir, first_run):
    tmp, root, _ = setup_dir
    cb, metrics = first_run
    assert np.isfinite(metrics["test/fid"]) and metrics["test/fid"] > 0
    assert metrics["test/fid"] == pytest.approx(cb.results["fid"])
    assert metrics["test/fid_n"] == N_SAMPLES and cb.results["n"] == N_SAMPLES and cb.results["n_real"] == N_TRAIN
    assert not any(k.startswith("test/bpd") for k in metrics)  # the likelihood was switched off
    assert cb.real_stats_computed == 1
    # the cache holds the metric's state of the real images: the feature sums of all training images
    cache = torch.load(tmp / "stats.pt", weights_only=True)
    assert cache["n"] == N_TRAIN and cache["key"].startswith("custom:tests.TinyFeatures-v1") and "sha256=" in cache["data"]
    state = cache["state"]
    feats = TinyFeatures()(read_cifar10(root, train=True)[0]).double()
    assert int(state["real_features_num_samples"]) == N_TRAIN
    torch.testing.assert_close(state["real_features_sum"], feats.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["real_features_cov_sum"], feats.T @ feats, rtol=1e-6, atol=1e-6)
    assert len(list((tmp / "run1" / "png").glob("*.png"))) == N_SAMPLES
    record = json.loads((Path(metrics["log_dir"]) / "fid.json").read_text())
    assert record["n"] == N_SAMPLES and record["comparable_to_papers"] is False and "CIFAR-10 train" in record["reference"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(metrics["log_dir"], size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "test/samples" in acc.Tags()["images"] and "test/fid" in acc.Tags()["scalars"]


@pytest.mark.slow
def test_real_stats_cache_is_reused_for_the_same_extractor_only(setup_dir, first_run):
    tmp, root, state = setup_dir
    cb1, _ = first_run
    features = TinyFeatures()
    with pytest.warns(UserWarning, match="not comparable"):
        cb2, _ = _run_test(tmp / "run2", root, state, real_stats_cache=str(tmp / "stats.pt"), features=features)
    assert cb2.real_stats_computed == 0
    assert features.images_seen == N_SAMPLES  # only the generated images were embedded, no training image
    assert cb2.results["fid"] == pytest.approx(cb1.results["fid"], rel=1e-6)
    # another extractor (other weights) must not reuse the cache: recomputed and the cache rewritten
    other = TinyFeatures()
    other.proj.mul_(2)
    assert FIDCallback(feature_module=other).extractor_key() != cb1.extractor_key()
    (tmp / "stats_other.pt").write_bytes((tmp / "stats.pt").read_bytes())  # a copy: the other tests keep theirs
    with pytest.warns(UserWarning, match="not comparable"), pytest.warns(UserWarning, match="another extractor"):
        cb3, _ = _run_test(tmp / "run3", root, state, real_stats_cache=str(tmp / "stats_other.pt"), features=other)
    assert cb3.real_stats_computed == 1 and other.images_seen == N_SAMPLES + N_TRAIN
    assert torch.load(tmp / "stats_other.pt", weights_only=True)["key"] == cb3.extractor_key()
    assert cb3.results["fid"] != pytest.approx(cb1.results["fid"], rel=1e-3)


def _collect_samples(model, batch_size: int, world: int, num: int = N_SAMPLES, seed: int = 3, **kw) -> torch.Tensor:
    """The uint8 samples that the callback feeds to the metric, rank by rank over ``world`` simulated
    ranks (this process plays each rank in turn), in index order."""

    class Collect:
        def __init__(self):
            self.parts = []

        def update(self, u8, real):
            assert not real
            self.parts.append(u8)

    out = torch.zeros(num, 3, 32, 32, dtype=torch.uint8)
    for rank in range(world):
        cb = FIDCallback(num_samples=num, batch_size=batch_size, feature_module=TinyFeatures(), seed=seed,
                         grid_size=0, **{"ode": {"rtol": 1e-2, "atol": 1e-2}, **kw})
        metric = Collect()
        shard = shard_indices(num, world, rank)
        cb._generate(SimpleNamespace(is_global_zero=rank == 0, global_rank=rank), model, metric, (3, 32, 32), True,
                     shard, model.ode.replace(**cb.ode))
        out[list(shard)] = torch.cat(metric.parts)
    return out


def test_sample_set_is_independent_of_batch_size_and_shards(setup_dir):
    """Per-sample seeds: the same samples whatever the batch size or the split over ranks."""
    _, _, state = setup_dir
    model = _model(state).eval()
    ref = _collect_samples(model, N_SAMPLES, 1, **RK4)
    assert ref.shape == (N_SAMPLES, 3, 32, 32) and ref.dtype == torch.uint8
    assert len({bytes(img.numpy()) for img in ref}) == N_SAMPLES  # every sample its own starting point
    for bs, world in ((5, 1), (4, 3)):
        assert torch.equal(_collect_samples(model, bs, world, **RK4), ref), (bs, world)
    # sample i depends on (seed, i) only, not on N; another seed gives other samples
    assert torch.equal(_collect_samples(model, 2, 1, num=2, **RK4), ref[:2])
    assert not torch.equal(_collect_samples(model, 2, 1, num=2, seed=4, **RK4), ref[:2])
    # adaptive dopri5 controls the error over the whole batch: the same starting points, end points
    # equal up to the solver tolerance, so only a few uint8 pixels may differ (this untrained net's
    # samples are far outside [-1, 1], so a flip near a clamp boundary can be a large jump)
    a, b = _collect_samples(model, 4, 1, num=4), _collect_samples(model, 2, 2, num=4)
    assert a.shape == b.shape == (4, 3, 32, 32)
    assert (a != b).float().mean() < 0.02


@pytest.mark.slow
def test_matches_torch_fidelity_on_png_folders(setup_dir, first_run):
    tmp, root, _ = setup_dir
    cb, _ = first_run
    real = tmp / "real_png"
    real.mkdir(exist_ok=True)
    from PIL import Image

    images = read_cifar10(root, train=True)[0]
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(real / f"{i:06d}.png")
    import torch_fidelity

    name = _register_with_torch_fidelity()
    out = torch_fidelity.calculate_metrics(
        input1=str(tmp / "run1" / "png"), input2=str(real), fid=True, feature_extractor=name,
        feature_layer_fid="tiny", cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=16,
    )
    fidelity = out["frechet_inception_distance"]
    feats = TinyFeatures()
    independent = _frechet_numpy(feats(_read_pngs(tmp / "run1" / "png")).double().numpy(), feats(images).double().numpy())
    print(f"\nFID (tiny extractor, N={N_SAMPLES}): callback {cb.results['fid']:.6f} | torch-fidelity {fidelity:.6f} | "
          f"scipy {independent:.6f}")
    assert cb.results["fid"] == pytest.approx(fidelity, rel=1e-4, abs=1e-6)
    assert cb.results["fid"] == pytest.approx(independent, rel=1e-4, abs=1e-6)


def test_missing_inception_weights_error_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    missing = tmp_path / "weights" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError) as err:
        FIDCallback(feature_extractor_weights_path=str(missing)).setup(None, None, "test")
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in msg and str(missing) in msg and "$TORCH_HOME/hub/checkpoints" in msg
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError) as err:
        FIDCallback().setup(None, None, "test")
    assert INCEPTION_WEIGHTS_FILE in str(err.value) and str(hub) in str(err.value)
    # a custom extractor needs no Inception weights
    FIDCallback(feature_module=TinyFeatures()).setup(None, None, "test")


class _NoSampling(HOSMModule):
    def sample(self, *args, **kwargs):
        raise AssertionError("sampled although the Inception weights are missing")


@pytest.mark.slow
def test_trainer_test_stops_before_sampling_without_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    write_fake_cifar10(tmp_path / "cifar", n_train=8, n_test=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[FIDCallback(num_samples=4)], default_root_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        trainer.test(_model(cls=_NoSampling), _datamodule(tmp_path / "cifar"), verbose=False)


# -- two processes ----------------------------------------------------------------------------------
def _launch_ranks(args: list[str], world: int = 2, timeout: float = SUBPROCESS_TIMEOUT) -> list[tuple[int, str, str]]:
    """This file as the worker of ``world`` ranks (LOCAL_RANK 0..world-1, gloo on 127.0.0.1), each in its own
    process group; (returncode, stdout, stderr) per rank. Past the deadline every group is killed."""
    env = clean_env(WORLD_SIZE=world, NODE_RANK=0)
    procs = [subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env={**env, "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in range(world)]
    return wait_all(procs, timeout)


@pytest.mark.slow
def test_two_process_ddp_fid_equals_one_process_with_and_without_the_cache(setup_dir, first_run, tmp_path):
    """2 ranks (gloo): real statistics sharded and summed (then read from the cache by rank 0), fake
    statistics synced in compute(); the same FID and the same sample PNGs as 1 process."""
    tmp, root, state = setup_dir
    cb1, _ = first_run
    start = time.perf_counter()
    for code, out, err in _launch_ranks([str(state), str(root), str(tmp_path)]):
        assert code == 0, out[-3000:] + err[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first, again = [r["computed"] for r in ranks], [r["cached"] for r in ranks]
    print(f"\nFID 1 process {cb1.results['fid']:.7f} | 2 processes {first[0]['fid']:.7f} (rank 1: {first[1]['fid']:.7f}), "
          f"from the cache {again[0]['fid']:.7f}; {time.perf_counter() - start:.0f} s")
    assert [r["world_size"] for r in first] == [2, 2]
    assert first[0]["fid"] == first[1]["fid"] == first[0]["logged"]
    assert first[0]["fid"] == pytest.approx(cb1.results["fid"], rel=1e-5)
    assert [r["computed"] for r in first] == [1, 1]  # no cache yet: computed once, sharded over both ranks
    # each rank embedded its own half of the training images and of the samples
    assert [r["images_seen"] for r in first] == [(N_TRAIN + N_SAMPLES) // 2] * 2
    # from the cache (loaded on rank 0, zeros elsewhere, summed): the same FID, no training image embedded
    assert [r["computed"] for r in again] == [0, 0] and [r["images_seen"] for r in again] == [N_SAMPLES // 2] * 2
    assert again[0]["fid"] == again[1]["fid"] == pytest.approx(first[0]["fid"], rel=1e-6)
    one, two = torch.load(tmp / "stats.pt", weights_only=True), torch.load(tmp_path / "stats.pt", weights_only=True)
    assert two["n"] == one["n"] == N_TRAIN and two["key"] == one["key"] and two["data"] == one["data"]
    for k in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
        torch.testing.assert_close(two["state"][k], one["state"][k], rtol=1e-10, atol=1e-12)
    assert len(list((tmp_path / "png").glob("*.png"))) == N_SAMPLES
    assert torch.equal(_read_pngs(tmp_path / "png"), _read_pngs(tmp / "run1" / "png"))


def _worker(argv: list[str]) -> None:
    """One rank: FID with the real statistics computed (and cached), then again with the cache."""
    state, root, out = argv[0], Path(argv[1]), Path(argv[2])
    torch.set_num_threads(1)
    devices, record = int(os.environ["WORLD_SIZE"]), {}  # (Lightning's teardown removes WORLD_SIZE)
    for run, png in (("computed", str(out / "png")), ("cached", None)):
        features = TinyFeatures()
        cb = _fid(features, real_stats_cache=str(out / "stats.pt"), png_dir=png)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                            default_root_dir=str(out))
        metrics = trainer.test(_model(state), _datamodule(root), verbose=False)[0]
        record[run] = {"fid": cb.results["fid"], "logged": metrics["test/fid"], "computed": cb.real_stats_computed,
                       "world_size": trainer.world_size, "images_seen": features.images_seen}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _worker(sys.argv[1:])
