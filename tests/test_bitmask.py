"""Bit-mask packing of the native format against numpy's own little-endian bit order."""
import numpy as np
import pytest
import torch

from sara_network.fileformat import indices_to_mask, mask_to_indices, pack_bits, unpack_bits


@pytest.mark.parametrize("numel,density", [(1, 1.0), (7, 0.5), (8, 0.3), (13, 0.9), (4096, 0.06), (100_003, 0.2)])
def test_mask_round_trip_matches_numpy(numel, density):
    generator = torch.Generator().manual_seed(numel)
    flags = torch.rand(numel, generator=generator) < density
    packed = pack_bits(flags)
    reference = np.unpackbits(packed.numpy(), bitorder="little")[:numel].astype(bool)
    assert np.array_equal(unpack_bits(packed, numel).numpy(), reference)
    expected = np.flatnonzero(reference).astype(np.int32)
    got = mask_to_indices(packed, numel)
    assert got.dtype == torch.int32 and np.array_equal(got.numpy(), expected)
    assert torch.equal(indices_to_mask(got, numel), packed)


def test_mask_to_indices_ignores_padding_bits_past_numel():
    packed = torch.tensor([0b1000_0001], dtype=torch.uint8)
    assert mask_to_indices(packed, 5).tolist() == [0]
