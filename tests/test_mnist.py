"""MNIST loading (bundled digits, IDX files) and the digit-quality metrics."""

import numpy as np
import pytest
import torch

from dipddpm.data.mnist import load_digit, load_mnist, read_idx, to_tensor
from dipddpm.digit_metrics import (
    DigitClassifier,
    _trace_sqrt_product,
    digit_quality,
    frechet_distance,
    get_digit_classifier,
    nearest_psnr,
)
from dipddpm.errors import ConfigError
from fixtures import write_idx


def tiny_mnist(folder, gz=False, n=6, prefix="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels = tiny_mnist(tmp_path, gz=gz)
    got_images, got_labels = load_mnist(root=tmp_path, split="train")
    assert got_images.dtype == np.uint8 and got_images.shape == (6, 28, 28)
    assert got_labels.dtype == np.int64
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    first, _ = load_mnist(root=tmp_path, limit=2)
    assert np.array_equal(first, images[:2])


def test_idx_header_is_standard(tmp_path):
    path = write_idx(tmp_path / "x-idx2-int", np.array([[1, -2], [3, 4]], dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2]) and raw[4:12] == bytes([0, 0, 0, 2, 0, 0, 0, 2])
    assert raw[12:16] == bytes([0, 0, 0, 1])  # big-endian 1
    assert read_idx(path).tolist() == [[1, -2], [3, 4]]


def test_test_split_and_missing_files(tmp_path):
    tiny_mnist(tmp_path, n=3, prefix="t10k")
    images, _ = load_mnist(root=tmp_path, split="test")
    assert images.shape == (3, 28, 28)
    with pytest.raises(ConfigError) as info:
        load_mnist(root=tmp_path / "nowhere")
    assert info.value.key == "data.root" and "train-images-idx3-ubyte" in info.value.allowed
    with pytest.raises(ConfigError, match="data.split"):
        load_mnist(root=tmp_path, split="valid")


def test_bundled_digits():
    images, labels = load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert images.max() == 255 and images.min() == 0
    assert np.array_equal(labels[:20], np.arange(20) % 10)
    assert np.array_equal(np.bincount(labels), np.full(10, 500))
    with pytest.raises(ConfigError, match="data.split"):
        load_mnist(split="test")
    with pytest.raises(ConfigError, match="data.limit"):
        load_mnist(limit=0)
    digit = load_digit(17)
    assert digit.shape == (1, 1, 28, 28) and torch.equal(digit[0, 0], torch.as_tensor(images[17]) / 255.0)
    with pytest.raises(ConfigError, match="data.index"):
        load_digit(5000)


def test_to_tensor_ranges():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    unit = to_tensor(images, "unit")
    assert unit.shape == (1, 1, 2, 2) and unit.dtype == torch.float32
    assert torch.allclose(unit.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
    assert torch.allclose(to_tensor(images, "symmetric").flatten(), torch.tensor([-1.0, 1.0, -0.6, -0.2]))
    assert to_tensor(images[0]).shape == (1, 1, 2, 2)
    with pytest.raises(ConfigError, match="data.value_range"):
        to_tensor(images, "centered")


def test_frechet_identical_and_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), abs=1e-6)
    assert frechet_distance(torch.as_tensor(a), torch.as_tensor(a + shift)) == pytest.approx(14.25, abs=1e-6)


def test_frechet_closed_form_for_diagonal_covariances():
    # features with exactly diagonal sample covariance: +-1 patterns scaled per dimension
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float)
    a, b = signs * [1.0, 2.0], signs * [3.0, 0.5] + [1.0, 0.0]
    cov_a, cov_b = np.diag([4 / 3, 16 / 3]), np.diag([36 / 3, 1 / 3])
    expected = 1.0 + np.trace(cov_a + cov_b) - 2 * np.sum(np.sqrt(np.diag(cov_a) * np.diag(cov_b)))
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert _trace_sqrt_product(cov_a, cov_b) == pytest.approx(np.sum(np.sqrt(np.diag(cov_a) * np.diag(cov_b))))


def test_eigen_route_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cov_a, cov_b = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
    expected = np.trace(scipy_linalg.sqrtm(cov_a @ cov_b)).real
    assert _trace_sqrt_product(cov_a, cov_b) == pytest.approx(expected, rel=1e-8)


def test_nearest_psnr_hand_values():
    reference = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    samples = torch.stack([torch.full((1, 2, 2), 0.9), torch.zeros(1, 2, 2)])
    psnr = nearest_psnr(samples, reference)
    assert psnr[0].item() == pytest.approx(20.0)  # nearest is all-ones, mse 0.01
    assert psnr[1].item() == pytest.approx(100.0)  # exact match is capped


def test_classifier_cache_and_quality(tmp_path):
    first = get_digit_classifier(tmp_path, "cpu", limit=300, epochs=1, max_seconds=3.0)
    assert isinstance(first, DigitClassifier) and not first.training
    assert 0.0 <= first.heldout_accuracy <= 1.0
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".pt"]
    second = get_digit_classifier(tmp_path, "cpu", limit=300, epochs=1, max_seconds=3.0)
    assert second.heldout_accuracy == first.heldout_accuracy
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    images = to_tensor(load_mnist(limit=40)[0])
    with torch.no_grad():
        assert first.features(images[:3]).shape == (3, 128)
        probs = first.softmax(images[:3])
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    quality = digit_quality(images[:10], images[10:], first)
    assert set(quality) == {"frechet", "confidence", "psnr_nearest"}
    assert 0.1 <= quality["confidence"] <= 1.0 and np.isfinite(quality["frechet"])
    same = digit_quality(images[:10], images, first)
    assert same["psnr_nearest"] == pytest.approx(100.0)
