"""Fast checks of the demo base: data splits, the paired-noise metric, the committed weights and DDIM sampling."""

import torch

from sara_network.demo.data import NEW_CLASSES, OLD_CLASSES, splits
from sara_network.demo.model import build_unet, denoising_loss, load_base, sample


def test_splits_are_disjoint_with_documented_sizes():
    data = splits()
    parts = {name: getattr(data, name) for name in ("pretrain", "old_eval", "new_train", "new_eval")}
    assert {name: len(split) for name, split in parts.items()} == {
        "pretrain": 1363,
        "old_eval": 80,
        "new_train": 200,
        "new_eval": 154,
    }
    all_indices = torch.cat([split.indices for split in parts.values()])
    assert len(set(all_indices.tolist())) == len(all_indices) == 1797
    assert set(data.pretrain.labels.tolist()) == set(OLD_CLASSES)
    assert data.old_eval.labels.bincount(minlength=10)[: len(OLD_CLASSES)].tolist() == [10] * len(OLD_CLASSES)
    assert data.new_train.labels.bincount(minlength=10)[list(NEW_CLASSES)].tolist() == [100, 100]
    assert set(data.new_eval.labels.tolist()) == set(NEW_CLASSES)
    assert data.pretrain.images.shape[1:] == (1, 16, 16) and data.pretrain.images.dtype == torch.float32
    assert data.pretrain.images.min() >= -1 and data.pretrain.images.max() <= 1
    assert torch.equal(splits().old_eval.images, data.old_eval.images)


def test_denoising_loss_is_deterministic():
    torch.manual_seed(0)
    unet = build_unet()
    images, labels = splits().old_eval.images[:16], splits().old_eval.labels[:16]
    first = denoising_loss(unet, images, labels, seed=3, draws=2)
    assert denoising_loss(unet, images, labels, seed=3, draws=2) == first
    assert denoising_loss(unet, images, labels, seed=4, draws=2) != first


def test_committed_base_has_learned_old_classes():
    old_eval = splits().old_eval
    base_loss = denoising_loss(load_base(), old_eval.images, old_eval.labels, seed=0, draws=2)
    torch.manual_seed(0)
    fresh_loss = denoising_loss(build_unet(), old_eval.images, old_eval.labels, seed=0, draws=2)
    assert base_loss < 0.06
    assert fresh_loss > 0.2


def test_ddim_sample_is_deterministic_per_seed():
    unet = load_base()
    first = sample(unet, [0, 9], seed=1, steps=5)
    assert first.shape == (2, 1, 16, 16)
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(sample(unet, [0, 9], seed=1, steps=5), first)
    assert not torch.equal(sample(unet, [0, 9], seed=2, steps=5), first)
