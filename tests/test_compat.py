"""sara_network.compat against the installed libraries. CI runs this file on current releases and
on kohya sd-scripts' pinned stack (transformers 4.54.1, diffusers 0.32.1), where the keywords differ."""
import torch

import models
from sara_network.compat import dtype_kwargs


def test_transformers_loads_in_the_asked_dtype(tmp_path):
    encoder = models.tiny_text_encoder(seed=3)
    encoder.save_pretrained(tmp_path / "te")
    loaded = type(encoder).from_pretrained(tmp_path / "te", **dtype_kwargs("transformers", torch.float16))
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    for (name, saved), (_, back) in zip(encoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(saved.to(torch.float16), back), name


def test_diffusers_loads_in_the_asked_dtype(tmp_path):
    unet = models.tiny_unet(seed=4)
    unet.save_pretrained(tmp_path / "unet")
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet", **dtype_kwargs("diffusers", torch.float16))
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    for (name, saved), (_, back) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(saved.to(torch.float16), back), name
