"""Sample quality for generated MNIST digits.

A small CNN classifier trained on the MNIST loader's train split (cached on disk through
``dipddpm.diffusion.checkpoints``) gives 128-d penultimate features and softmax
probabilities. ``digit_quality`` reports a Frechet distance between sample and
reference features, the mean classifier confidence on the samples, and the mean PSNR
of each sample to its nearest reference digit. Images are (N, 1, 28, 28) in [0, 1].
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dipddpm.data.mnist import load_mnist, to_tensor
from dipddpm.diffusion.checkpoints import load_or_train_with_info

try:
    import scipy.linalg as _scipy_linalg
except ImportError:
    _scipy_linalg = None

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """conv(1-16)-ReLU-pool, conv(16-32)-ReLU-pool, fc(32*7*7-128)-ReLU (features), fc(128-10).

    Input (B, 1, 28, 28) in [0, 1]; features (B, 128); forward gives logits (B, 10).
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * 7 * 7, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv((x - 0.5) / 0.5)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(dim=1)


def _split_holdout(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (train, held out): a seeded random ``fraction`` of 0..n-1 is held out."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction)) if n > 1 else 0
    return np.sort(order[cut:]), np.sort(order[:cut])


def train_digit_classifier(
    model: DigitClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    max_seconds: float | None = None,
) -> DigitClassifier:
    """Adam + cross-entropy on images (N, 1, 28, 28) in [0, 1] and int64 labels (N,);
    stops early after ``max_seconds`` of wall time if set. Returns the model in eval mode."""
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(device)
        for begin in range(0, len(images), batch_size):
            batch = order[begin : begin + batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                return model.eval()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> float:
    """Fraction of ``images`` (N, C, H, W, in the range ``model`` takes) that ``model`` (logits per
    class) labels as their ``labels`` (N,)."""
    device = next(model.parameters()).device
    correct = 0
    for begin in range(0, len(images), batch_size):
        logits = model(images[begin : begin + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[begin : begin + batch_size]).sum())
    return correct / max(len(images), 1)


def get_digit_classifier(
    cache_dir,
    device="cpu",
    *,
    root=None,
    limit: int | None = None,
    epochs: int = 4,
    seed: int = 0,
    max_seconds: float | None = None,
) -> DigitClassifier:
    """The digit classifier for the MNIST train split (``root``/``limit`` as in load_mnist),
    trained once and cached under ``cache_dir``; returned on ``device`` in eval mode.

    A seeded random 10% of the digits is held out; its accuracy is stored as ``info["heldout_accuracy"]``
    in the cache's JSON and as the attribute ``heldout_accuracy`` of the returned model.
    """
    key = {"kind": "digit_classifier", "version": 1, "root": None if root is None else str(root),
           "limit": limit, "epochs": epochs, "seed": seed, "max_seconds": max_seconds}

    def build() -> DigitClassifier:
        torch.manual_seed(seed)
        return DigitClassifier().to(device)

    def train(model: DigitClassifier):
        raw, labels = load_mnist(root, "train", limit)
        images, labels = to_tensor(raw, "unit"), torch.as_tensor(labels)
        fit, held = _split_holdout(len(images), seed=seed)
        started = time.perf_counter()
        train_digit_classifier(model, images[fit], labels[fit], epochs=epochs, seed=seed, max_seconds=max_seconds)
        accuracy = classifier_accuracy(model, images[held], labels[held]) if len(held) else float("nan")
        return model, {"heldout_accuracy": accuracy, "train_seconds": time.perf_counter() - started,
                       "train_images": int(len(fit))}

    model, _, info = load_or_train_with_info(cache_dir, key, build, train)
    model.heldout_accuracy = info.get("heldout_accuracy")
    return model.eval()


def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """trace(sqrtm(A B)) for symmetric PSD A, B via eig of sqrt(A) B sqrt(A)."""
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum())


def _trace_sqrt_scipy(cov_a: np.ndarray, cov_b: np.ndarray) -> float | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = _scipy_linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(root)):
        return None
    if np.iscomplexobj(root):
        if np.abs(root.imag).max() > 1e-3 * max(np.abs(root.real).max(), 1.0):
            return None
        root = root.real
    return float(np.trace(root))


def frechet_distance(feat_a, feat_b) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 sqrtm(C_a C_b)) for features (N, D), (M, D), N, M >= 2.

    Covariances are unbiased (ddof 1). The trace of the matrix square root uses
    scipy.linalg.sqrtm when available and finite, else an eigen-decomposition of
    sqrt(C_a) C_b sqrt(C_a). Returns a float >= 0 (up to rounding).
    """
    a = np.asarray(feat_a.detach().cpu() if isinstance(feat_a, torch.Tensor) else feat_a, dtype=np.float64)
    b = np.asarray(feat_b.detach().cpu() if isinstance(feat_b, torch.Tensor) else feat_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two feature sets (N>=2, D) with the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    trace_root = _trace_sqrt_scipy(cov_a, cov_b) if _scipy_linalg is not None else None
    if trace_root is None:
        trace_root = _trace_sqrt_product(cov_a, cov_b)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


@torch.no_grad()
def _features_and_probs(classifier: DigitClassifier, images: torch.Tensor, batch_size: int):
    device = next(classifier.parameters()).device
    feats, probs = [], []
    for begin in range(0, len(images), batch_size):
        features = classifier.features(images[begin : begin + batch_size].to(device, torch.float32))
        feats.append(features.cpu())
        probs.append(classifier.head(features).softmax(1).cpu())
    return torch.cat(feats).double(), torch.cat(probs).double()


@torch.no_grad()
def nearest_psnr(samples: torch.Tensor, reference: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per sample, PSNR (data_range 1) to the reference image with the smallest MSE: (N,) float64.

    An exact match is capped at 100 dB (MSE floor 1e-10).
    """
    ref = reference.flatten(1).double()
    ref_sq = (ref**2).sum(1)
    best = []
    for begin in range(0, len(samples), batch_size):
        s = samples[begin : begin + batch_size].flatten(1).double().to(ref.device)
        sq = (s**2).sum(1, keepdim=True) + ref_sq[None, :] - 2.0 * s @ ref.T
        best.append(sq.min(dim=1).values.clamp_min(0) / ref.shape[1])
    mse = torch.cat(best).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def digit_quality(samples: torch.Tensor, reference: torch.Tensor, classifier: DigitClassifier,
                  batch_size: int = 256) -> dict:
    """{"frechet", "confidence", "psnr_nearest"} for samples (N, 1, 28, 28) against reference
    (M, 1, 28, 28); both are clamped to [0, 1] first. N, M >= 2 for the Frechet distance.

    frechet: Frechet distance of classifier features; confidence: mean max softmax over
    the samples; psnr_nearest: mean over samples of the PSNR to the nearest reference digit.
    """
    samples = samples.detach().float().cpu().clamp(0, 1)
    reference = reference.detach().float().cpu().clamp(0, 1)
    feat_s, prob_s = _features_and_probs(classifier, samples, batch_size)
    feat_r, _ = _features_and_probs(classifier, reference, batch_size)
    return {
        "frechet": frechet_distance(feat_s, feat_r),
        "confidence": float(prob_s.max(dim=1).values.mean()),
        "psnr_nearest": float(nearest_psnr(samples, reference, batch_size).mean()),
    }
