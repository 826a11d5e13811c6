"""An SVC digit classifier used to check that samples show the class they were conditioned on."""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.svm import SVC

from .data import load_digits_16


def _to_features(images16: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) images in [-1, 1] -> (N, 64) features in [0, 1], back at the digits' native 8x8."""
    images8 = F.avg_pool2d(images16.detach().cpu().float(), kernel_size=2)
    return ((images8.clamp(-1, 1) + 1) / 2).flatten(1).numpy()


@lru_cache(maxsize=1)
def _fit() -> SVC:
    # Trained on all 1797 digits after the same 8 -> 16 -> 8 round trip the samples go through, so the classifier
    # sees the same interpolation artefacts at train and test time.
    images, labels = load_digits_16()
    return SVC().fit(_to_features(images), labels.numpy())


def classify(images16: torch.Tensor) -> np.ndarray:
    """Predicted digit (0-9) for each (1, 16, 16) image in [-1, 1]."""
    return _fit().predict(_to_features(images16))
