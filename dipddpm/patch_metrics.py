"""Sample quality for generated 32x32 colour images (report R5).

A small CNN is trained to classify which class a 32x32 image belongs to (for patches32:
which photo a patch was cut from; for CIFAR-10: its class) on the set's train split and
cached on disk through ``dipddpm.diffusion.checkpoints``. Its 32-d penultimate features
give a Frechet distance between generated samples and the held-out split
(``digit_metrics.frechet_distance``). Images are (N, 3, 32, 32) in [-1, 1].
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dipddpm.data.cifar import ImageSet
from dipddpm.diffusion.checkpoints import load_or_train_with_info
from dipddpm.digit_metrics import classifier_accuracy, frechet_distance

FEATURE_DIM = 32
ENCODER_VERSION = 1


class PatchEncoder(nn.Module):
    """Three conv3x3-SiLU-maxpool stages (3-16-32-32 channels, 32 -> 4 px), fc(512-32)-SiLU
    (the features), fc(32-classes). Input (B, 3, 32, 32) in [-1, 1]; forward gives logits."""

    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) -> (B, FEATURE_DIM)."""
        return F.silu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_encoder(model: PatchEncoder, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                  batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> PatchEncoder:
    """Adam + cross-entropy with random horizontal flips; images (N, 3, 32, 32) in [-1, 1],
    int64 labels (N,). Returns the model in eval mode."""
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(int(epochs)):
        order = torch.randperm(len(images), generator=generator).to(device)
        for begin in range(0, len(images), batch_size):
            index = order[begin : begin + batch_size]
            batch = images[index]
            mirror = (torch.rand(len(index), generator=generator) < 0.5).to(device)
            batch = torch.where(mirror[:, None, None, None], batch.flip(-1), batch)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def get_encoder(cache_dir, train: ImageSet, test: ImageSet, data_identity: dict, *, device="cpu",
                epochs: int = 6, seed: int = 0) -> PatchEncoder:
    """The encoder for ``train`` (an ImageSet), trained once and cached under ``cache_dir``
    (key: data_identity, classes, epochs, seed); on ``device`` in eval mode, with its
    accuracy on ``test`` as the attribute ``heldout_accuracy``."""
    classes = len(train.classes)
    key = {"kind": "patch_encoder", "version": ENCODER_VERSION, "data": data_identity, "classes": classes,
           "epochs": int(epochs), "seed": int(seed), "feature_dim": FEATURE_DIM}

    def build() -> PatchEncoder:
        torch.manual_seed(int(seed))
        return PatchEncoder(classes).to(device)

    def fit(model: PatchEncoder):
        started = time.perf_counter()
        train_encoder(model, train.images, train.labels, epochs=epochs, seed=seed)
        return model, {"heldout_accuracy": classifier_accuracy(model, test.images, test.labels),
                       "train_seconds": time.perf_counter() - started, "train_images": len(train)}

    model, _, info = load_or_train_with_info(cache_dir, key, build, fit)
    model.heldout_accuracy = info.get("heldout_accuracy")
    return model.eval()


@torch.no_grad()
def encode(encoder: PatchEncoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features (N, FEATURE_DIM) float64 of images (N, 3, 32, 32), clamped to [-1, 1] first."""
    device = next(encoder.parameters()).device
    parts = [encoder.features(images[i : i + batch_size].to(device, torch.float32).clamp(-1, 1)).cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).double()


def patch_frechet(samples: torch.Tensor, reference: torch.Tensor, encoder: PatchEncoder) -> float:
    """Frechet distance of encoder features between samples (N, 3, 32, 32) and reference
    (M, 3, 32, 32), both in [-1, 1] (clamped); N, M >= 2."""
    return frechet_distance(encode(encoder, samples), encode(encoder, reference))


def real_frechet(train: ImageSet, reference: torch.Tensor, encoder: PatchEncoder, count: int, seed: int = 0) -> float:
    """The Frechet distance that ``count`` real training images (a seeded random choice)
    reach against ``reference``: what a perfect generator scores with that many samples."""
    choice = np.random.default_rng(int(seed)).choice(len(train), size=min(int(count), len(train)), replace=False)
    return patch_frechet(train.images[torch.as_tensor(np.sort(choice))], reference, encoder)
