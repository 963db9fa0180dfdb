"""FIDCallback: real-statistics cache, per-sample seeds, agreement with torch-fidelity, DDP, weights error.

Everything runs on a fake CIFAR-10 folder with a tiny random-projection feature extractor, so no
Inception weights (and no network) are needed. The same extractor is registered with
torch-fidelity's feature-extractor registry, so ``torch_fidelity.calculate_metrics`` on the
written PNG folders is an independent cross-check of the number.

This file is also the worker script of the two-process test:
``python tests/test_fid.py fid <devices> <state_dict> <cifar root> <out dir>``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import clean_env  # noqa: E402
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from hosm_lightning.core.sde import VPSDE  # noqa: E402
from hosm_lightning.data import CIFAR10DataModule, read_cifar10, write_fake_cifar10  # noqa: E402
from hosm_lightning.lit.fid import INCEPTION_WEIGHTS_FILE, FIDCallback, sample_shard  # noqa: E402
from hosm_lightning.lit.module import HOSMModule  # noqa: E402
from hosm_lightning.nets import SmallConvNet  # noqa: E402

N_SAMPLES, N_TRAIN, DIM = 12, 40, 6
#: fixed-step sampler: per-sample results do not depend on batch composition at all
RK4 = {"ode": {"method": "rk4", "step_size": 0.25}}
SUBPROCESS_TIMEOUT = 240


class TinyFeatures(nn.Module):
    """uint8 [N, 3, H, W] -> [N, DIM]: 4x4 average pooling, a fixed random projection, tanh."""

    num_features = DIM
    fid_key = "tests.TinyFeatures-v1"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, DIM, generator=g, dtype=torch.float64) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8, x.dtype
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


def _model(state_dict_path: str | Path | None = None) -> HOSMModule:
    torch.manual_seed(0)
    model = HOSMModule(SmallConvNet(channels=8, depth=1), sde=VPSDE())
    if state_dict_path is not None:
        model.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return model


class _SamplesOnly(HOSMModule):
    """The module without its per-batch bits/dim (FID is what these tests measure)."""

    def test_step(self, batch, batch_idx):
        return None


def _datamodule(root: Path) -> CIFAR10DataModule:
    return CIFAR10DataModule(str(root), batch_size=4, eval_batch_size=4, num_workers=0, val_size=4)


def _trainer(tmp: Path, cb: FIDCallback, **kw) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp / "tb"), name="fid"),
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                     limit_test_batches=1, default_root_dir=str(tmp), **kw)


def _run_test(tmp: Path, root: Path, state: Path, **cb_kw) -> tuple[FIDCallback, dict]:
    cb = FIDCallback(num_samples=N_SAMPLES, batch_size=5, feature_module=TinyFeatures(), seed=7, grid_size=9,
                     **{**RK4, **cb_kw})
    model = _SamplesOnly(SmallConvNet(channels=8, depth=1), sde=VPSDE())
    model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
    trainer = _trainer(tmp, cb)
    metrics = trainer.test(model, _datamodule(root))[0]
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
import pytest  # noqa: E402


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
def test_logs_fid_and_writes_cache_and_pngs(setup_dir, first_run):
    tmp, _, _ = setup_dir
    cb, metrics = first_run
    assert np.isfinite(metrics["test/fid"]) and metrics["test/fid"] > 0
    assert metrics["test/fid_n"] == N_SAMPLES and cb.results["n"] == N_SAMPLES and cb.results["n_real"] == N_TRAIN
    assert cb.real_stats_computed == 1
    cache = torch.load(tmp / "stats.pt", weights_only=True)
    assert cache["n"] == N_TRAIN and cache["mean"].shape == (DIM,) and cache["cov"].shape == (DIM, DIM)
    assert cache["key"].startswith("custom:tests.TinyFeatures-v1") and "sha256=" in cache["data"]
    assert len(list((tmp / "run1" / "png").glob("*.png"))) == N_SAMPLES
    record = json.loads((Path(metrics["log_dir"]) / "fid.json").read_text())
    assert record["n"] == N_SAMPLES and record["comparable_to_papers"] is False and "CIFAR-10 train" in record["reference"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(metrics["log_dir"], size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "test/samples" in acc.Tags()["images"] and "test/fid" in acc.Tags()["scalars"]


def test_real_stats_cache_is_reused(setup_dir, first_run, monkeypatch):
    tmp, root, state = setup_dir
    cb1, metrics1 = first_run

    def boom(*args, **kwargs):
        raise AssertionError("real statistics recomputed although the cache is valid")

    monkeypatch.setattr(FIDCallback, "compute_real_stats", boom)
    with pytest.warns(UserWarning, match="not comparable"):
        cb2, _ = _run_test(tmp / "run2", root, state, real_stats_cache=str(tmp / "stats.pt"))
    assert cb2.real_stats_computed == 0
    assert cb2.results["fid"] == pytest.approx(cb1.results["fid"], rel=1e-6)
    # a different extractor (other weights) must not reuse the cache
    monkeypatch.undo()
    other = TinyFeatures()
    other.proj.mul_(2)
    cb3 = FIDCallback(num_samples=N_SAMPLES, feature_module=other, real_stats_cache=str(tmp / "stats.pt"))
    assert cb3.extractor_key() != cb1.extractor_key()


def test_sample_set_independent_of_batch_size_and_shards(setup_dir):
    """Per-sample seeds: the same samples whatever the batch size or the split over ranks."""
    _, _, state = setup_dir
    model = _model(state).eval()

    def samples(batch_size: int, world: int, num: int = N_SAMPLES, **kw) -> torch.Tensor:
        class _Collect:
            def __init__(self):
                self.parts = []

            def update(self, u8, real):
                self.parts.append(u8)

        out = []
        for rank in range(world):
            cb = FIDCallback(num_samples=num, batch_size=batch_size, feature_module=TinyFeatures(), seed=3,
                             grid_size=0, **{"ode": {"rtol": 1e-2, "atol": 1e-2}, **kw})
            metric = _Collect()
            fake_trainer = SimpleNamespace(is_global_zero=rank == 0, global_rank=rank)
            cb._generate(fake_trainer, model, metric, (3, 32, 32), True, sample_shard(num, world, rank),
                         model.ode.replace(**cb.ode))
            out.append(torch.cat(metric.parts))
        return torch.cat(out)

    ref = samples(N_SAMPLES, 1, **RK4)
    assert ref.shape == (N_SAMPLES, 3, 32, 32) and ref.dtype == torch.uint8
    for bs, world in ((5, 1), (3, 2), (4, 3)):
        assert torch.equal(samples(bs, world, **RK4), ref), (bs, world)
    # adaptive dopri5 controls the error over the whole batch: the same starting points, end points
    # equal up to the solver tolerance, so only a few uint8 pixels may differ (this untrained net's
    # samples are far outside [-1, 1], so a flip near a clamp boundary can be a large jump)
    a, b = samples(6, 1, num=6), samples(3, 2, num=6)
    assert a.shape == b.shape == (6, 3, 32, 32)
    assert (a != b).float().mean() < 0.02


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
    # through the Trainer: one clear error before any sampling
    cb = FIDCallback(num_samples=4)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[cb]).test(
            _model(), _datamodule(_fake(tmp_path)))


def _fake(tmp: Path) -> Path:
    write_fake_cifar10(tmp / "cifar", n_train=8, n_test=2)
    return tmp / "cifar"


# -- two processes ----------------------------------------------------------------------------------
def _run_group(cmd: list[str], env: dict, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (Lightning's rank-1 child too)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[2:4]} timed out after {timeout} s\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_process_ddp_fid_equals_one_process(setup_dir, first_run, tmp_path):
    """2 ranks (gloo): real stats sharded + all-reduced, fake stats synced in compute(); same FID."""
    tmp, root, state = setup_dir
    cb1, _ = first_run
    start = time.perf_counter()
    res = _run_group([sys.executable, __file__, "fid", "2", str(state), str(root), str(tmp_path)], clean_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"\nFID 1 process {cb1.results['fid']:.7f} | 2 processes {ranks[0]['fid']:.7f} (rank 1: {ranks[1]['fid']:.7f}); "
          f"{time.perf_counter() - start:.0f} s")
    assert ranks[0]["fid"] == ranks[1]["fid"] == ranks[0]["logged"]
    assert ranks[0]["fid"] == pytest.approx(cb1.results["fid"], rel=1e-5)
    assert ranks[0]["computed"] == ranks[1]["computed"] == 1  # no cache: computed once, sharded over both ranks
    one, two = torch.load(tmp / "stats.pt", weights_only=True), torch.load(tmp_path / "stats.pt", weights_only=True)
    assert two["n"] == one["n"] == N_TRAIN
    torch.testing.assert_close(two["mean"], one["mean"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(two["cov"], one["cov"], rtol=1e-9, atol=1e-12)
    assert len(list((tmp_path / "png").glob("*.png"))) == N_SAMPLES
    assert torch.equal(_read_pngs(tmp_path / "png"), _read_pngs(tmp / "run1" / "png"))


def _worker(argv: list[str]) -> None:
    mode, devices, state, root, out = argv[0], int(argv[1]), argv[2], Path(argv[3]), Path(argv[4])
    assert mode == "fid"
    torch.set_num_threads(1)
    cb = FIDCallback(num_samples=N_SAMPLES, batch_size=5, feature_module=TinyFeatures(), seed=7, grid_size=9,
                     real_stats_cache=str(out / "stats.pt"), png_dir=str(out / "png"), **RK4)
    model = _SamplesOnly(SmallConvNet(channels=8, depth=1), sde=VPSDE())
    model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], limit_test_batches=1,
                        default_root_dir=str(out))
    metrics = trainer.test(model, _datamodule(root), verbose=False)[0]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"fid": cb.results["fid"], "logged": metrics["test/fid"], "computed": cb.real_stats_computed}))


if __name__ == "__main__":
    _worker(sys.argv[1:])
