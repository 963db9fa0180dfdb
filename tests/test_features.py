"""hosm_lightning.features: a small digit classifier as the feature space of FID/KID on scikit-learn's
8×8 digits (17 grey levels), checked against held-out accuracy, against corrupted images, against
independent numpy/scipy formulas, and for its bootstrap standard error against fresh samples."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits
from torchmetrics.image.fid import FrechetInceptionDistance

from hosm_lightning.features import (
    FeatureExtractor,
    FeatureNet,
    fid_from_features,
    fid_standard_error,
    load_feature_net,
    sample_quality,
    save_feature_net,
    train_feature_net,
)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Metric `Kernel Inception")]
LEVELS = 17


@pytest.fixture(scope="module")
def digits():
    """Train (1000) / held-out (797) split of the 1797 digits, uint8 levels 0..16, [N, 1, 8, 8]."""
    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.uint8)[:, None]
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1000]], y[perm[:1000]], x[perm[1000:]], y[perm[1000:]]


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    xtr, ytr, xte, yte = digits
    return train_feature_net(xtr, ytr, levels=LEVELS, steps=400, seed=0, val=(xte, yte))


@pytest.fixture(scope="module")
def extractor(trained):
    return FeatureExtractor(trained[0])


def _noise(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, LEVELS, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)


def test_the_digit_classifier_generalises_to_held_out_digits(trained):
    net, info = trained
    assert info["val_accuracy"] > 0.9, info
    assert info["train_accuracy"] > 0.9 and info["steps"] == 400 and info["seconds"] > 0, info
    assert info["num_params"] == sum(p.numel() for p in net.parameters()) < 100_000
    assert net.features(torch.rand(5, 1, 8, 8)).shape == (5, 64) and net(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert not net.training and net.levels == LEVELS


def test_training_is_deterministic_and_leaves_the_global_rng_alone(digits):
    xtr, ytr = digits[0][:200], digits[1][:200]
    before = torch.get_rng_state()
    a, _ = train_feature_net(xtr, ytr, levels=LEVELS, steps=5, seed=3)
    b, _ = train_feature_net(xtr, ytr, levels=LEVELS, steps=5, seed=3)
    c, _ = train_feature_net(xtr, ytr, levels=LEVELS, steps=5, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.head.weight, c.head.weight)


def test_fid_and_kid_tell_real_digits_from_corrupted_ones(digits, extractor):
    xtr, _, xte, _ = digits
    kw = {"kid_subset_size": 300, "kid_subsets": 10}
    same = sample_quality(xtr, xte, extractor, **kw)
    assert (same["n_real"], same["n_fake"], same["kid_subset_size"]) == (1000, 797, 300)
    assert 0 < same["fid"] < 10, same
    kid_noise_floor = abs(same["kid_mean"]) + same["kid_std"]
    corrupted = {"noise": _noise(797, torch.Generator().manual_seed(1)), "inverted": LEVELS - 1 - xte,
                 "shifted": torch.roll(xte, 2, dims=3)}
    for name, fake in corrupted.items():
        bad = sample_quality(xtr, fake, extractor, **kw)
        assert bad["fid"] > 20 * same["fid"], (name, bad, same)
        assert bad["kid_mean"] > 20 * kid_noise_floor, (name, bad, same)
    itself = sample_quality(xtr, xtr, extractor, **kw)
    assert abs(itself["fid"]) < 1e-6, itself


def test_fid_matches_scipy_on_the_same_features(digits, extractor):
    xtr, _, xte, _ = digits
    for fake in (xte, torch.roll(xte, 1, dims=2)):
        fr, ff = extractor(xtr).numpy(), extractor(fake).numpy()
        assert fr.dtype == np.float64 and fr.shape == (1000, 64)
        s_r, s_f = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
        root = scipy.linalg.sqrtm(s_r @ s_f).real
        ref = np.sum((fr.mean(0) - ff.mean(0)) ** 2) + np.trace(s_r + s_f - 2 * root)
        got = sample_quality(xtr, fake, extractor, kid_subsets=1)["fid"]
        assert got == pytest.approx(ref, rel=1e-6)
        assert float(fid_from_features(torch.from_numpy(fr), torch.from_numpy(ff))) == pytest.approx(ref, rel=1e-6)


def test_kid_matches_an_unbiased_cubic_kernel_mmd(digits, extractor):
    real, fake = digits[0][:400], digits[2][:400]
    x, y = extractor(real).numpy(), extractor(fake).numpy()
    d, m = x.shape[1], len(x)

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    ref = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    whole = sample_quality(real, fake, extractor, kid_subset_size=m, kid_subsets=3)  # every subset is everything
    assert whole["kid_mean"] == pytest.approx(ref, rel=1e-9) and whole["kid_std"] < 1e-9 * abs(ref)
    # proper subsets: seeded (same seed, same value), and the global RNG is not touched
    before = torch.get_rng_state()
    a, b, c = (sample_quality(real, fake, extractor, kid_subset_size=100, kid_subsets=5, seed=s)
               for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), before)
    assert a == b and a["kid_mean"] != c["kid_mean"] and a["kid_std"] > 0


def test_the_extractor_serves_torchmetrics_directly(digits, extractor):
    """num_features spares torchmetrics' dummy 3×299×299 forward (which the extractor would refuse),
    the metric's train() must not put the network into training mode, FID comes back in float64."""
    metric = FrechetInceptionDistance(feature=extractor).train()
    assert not extractor.net.training
    metric.update(digits[0], real=True)
    metric.update(digits[2], real=False)
    fid = metric.compute()
    # the levels k are seen as k/16, as in training
    assert torch.equal(extractor(digits[2]), extractor.net.features(digits[2].float() / 16).double())
    assert fid.dtype == torch.float64
    assert float(fid) == pytest.approx(float(fid_from_features(extractor(digits[0]), extractor(digits[2]))), rel=1e-9)


def test_the_bootstrap_standard_error_matches_the_spread_over_fresh_samples(digits, extractor):
    """Fake = uniform-noise images, of which there is an endless supply: the std of the FID over 30
    fresh 200-image fake sets (real fixed) against the bootstrap s.e. computed from single sets."""
    xtr, gen, m = digits[0], torch.Generator().manual_seed(7), 200
    fr = extractor(xtr)
    spread = torch.stack([fid_from_features(fr, extractor(_noise(m, gen))) for _ in range(30)]).std()
    runs = [fid_standard_error(xtr, _noise(m, gen), extractor, n_boot=50, seed=i) for i in range(3)]
    se = np.mean([r["se"] for r in runs])
    assert 0.6 < se / float(spread) < 1.6, (se, float(spread))
    again = fid_standard_error(xtr, digits[2], extractor, n_boot=20, seed=1)
    assert again == fid_standard_error(xtr, digits[2], extractor, n_boot=20, seed=1)
    assert again["method"] == "bootstrap over fake" and again["n_boot"] == 20
    assert again["fid"] == pytest.approx(sample_quality(xtr, digits[2], extractor, kid_subsets=1)["fid"], rel=1e-9)
    both = fid_standard_error(xtr, digits[2], extractor, n_boot=20, seed=1, resample_real=True)
    assert both["method"] == "bootstrap over real and fake" and both["se"] != again["se"]


def test_save_and_load_give_identical_features(tmp_path, trained, digits):
    net = trained[0]
    save_feature_net(net, tmp_path / "f.pt")
    back = load_feature_net(tmp_path / "f.pt")
    assert isinstance(back, FeatureNet) and back.levels == LEVELS and not back.training
    assert torch.equal(FeatureExtractor(back)(digits[2]), FeatureExtractor(net)(digits[2]))


def test_a_missing_or_corrupt_feature_net_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_feature_net(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="bad.pt"):
        load_feature_net(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not a feature-network file"):
        load_feature_net(tmp_path / "other.pt")


@pytest.mark.parametrize("bad,match", [
    (lambda x: x.float(), "uint8"),
    (lambda x: x.clone().index_fill_(0, torch.tensor([3]), LEVELS), "grey level 17, but levels=17"),
    (lambda x: x.expand(-1, 3, -1, -1), "3 channels but the feature network expects 1"),
    (lambda x: x[:, 0], r"shape \[N, C, H, W\]"),
])
def test_bad_images_are_refused_naming_the_problem(digits, extractor, bad, match):
    xtr, ytr, xte, _ = digits
    with pytest.raises(ValueError, match=match):
        extractor(bad(xte[:10]))
    with pytest.raises(ValueError, match=match):
        sample_quality(xtr, bad(xte), extractor, kid_subsets=1)
    if "channels" not in match:  # training takes its channel count from the images
        with pytest.raises(ValueError, match=match):
            train_feature_net(bad(xtr), ytr, levels=LEVELS, steps=1)


def test_bad_labels_and_subset_sizes_are_refused(digits, extractor):
    xtr, ytr, xte, _ = digits
    with pytest.raises(ValueError, match="int64"):
        train_feature_net(xtr, ytr.int(), levels=LEVELS, steps=1)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        train_feature_net(xtr, ytr, levels=LEVELS, num_classes=5, steps=1)
    with pytest.raises(ValueError, match="kid_subset_size"):
        sample_quality(xtr, xte[:50], extractor, kid_subset_size=100)
