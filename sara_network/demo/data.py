"""sklearn digits at 16x16, split into old classes (0-7, pretraining) and new classes (8, 9, fine-tuning target).

Everything is deterministic: the same seed always gives the same images, order and splits, so pretraining,
fine-tuning and evaluation all see identical data.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


OLD_CLASSES = tuple(range(8))
NEW_CLASSES = (8, 9)
NULL_CLASS = 10  # class-embedding row used for label dropout (unconditional)
OLD_EVAL_PER_CLASS = 10
NEW_TRAIN_PER_CLASS = 100


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 16, 16) in [-1, 1], labels (N,) and their indices into `load_digits_16` order."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DigitSplits:
    pretrain: Split  # digits 0-7 minus old_eval
    old_eval: Split  # OLD_EVAL_PER_CLASS per class of 0-7: measures forgetting
    new_train: Split  # NEW_TRAIN_PER_CLASS per class of 8, 9: the fine-tuning set
    new_eval: Split  # the remaining 8s and 9s: measures learning


def load_digits_16(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as float32 images (N, 1, 16, 16) in [-1, 1] and int64 labels (N,), shuffled by `seed`.

    The 8x8 originals (values 0..16) are scaled to [0, 1] and bilinearly upsampled so the UNet has three resolutions
    (16, 8, 4) to work with.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    images = images * 2.0 - 1.0
    labels = torch.from_numpy(digits.target).long()
    # numpy's legacy RandomState stream is frozen across versions, so the order never changes under us.
    order = torch.from_numpy(np.random.RandomState(seed).permutation(len(labels)))
    return images[order].contiguous(), labels[order].contiguous()


def splits(seed: int = 0) -> DigitSplits:
    """Split the shuffled digits into disjoint pretraining, fine-tuning and evaluation sets.

    Sizes with seed 0: pretrain 1363, old_eval 80, new_train 200, new_eval 154. Each split keeps the shuffled order.
    """
    images, labels = load_digits_16(seed)
    parts = {name: [] for name in ("pretrain", "old_eval", "new_train", "new_eval")}
    for cls in OLD_CLASSES:
        idx = (labels == cls).nonzero().flatten()
        parts["old_eval"].append(idx[:OLD_EVAL_PER_CLASS])
        parts["pretrain"].append(idx[OLD_EVAL_PER_CLASS:])
    for cls in NEW_CLASSES:
        idx = (labels == cls).nonzero().flatten()
        parts["new_train"].append(idx[:NEW_TRAIN_PER_CLASS])
        parts["new_eval"].append(idx[NEW_TRAIN_PER_CLASS:])

    def make(chunks: list[torch.Tensor]) -> Split:
        idx = torch.cat(chunks).sort().values
        return Split(images=images[idx], labels=labels[idx], indices=idx)

    return DigitSplits(**{name: make(chunks) for name, chunks in parts.items()})
