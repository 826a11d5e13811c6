"""sara-network: SaRA (ICLR 2025) sparse fine-tuning for Stable Diffusion.

`--network_module sara_network` in kohya-ss/sd-scripts uses the two module-level functions below.
Only torch, safetensors and toml are imported here; diffusers, bitsandbytes, accelerate and PEFT
are optional and imported where they are used.
"""
__version__ = "0.1.0"

from .kohya import SaraKohyaNetwork, create_network, create_network_from_weights  # noqa: E402
from .network import SaraNetwork  # noqa: E402
from .options import OPTIONS, SaraConfig, parse_network_args  # noqa: E402

__all__ = ["create_network", "create_network_from_weights", "SaraNetwork", "SaraKohyaNetwork", "SaraConfig",
           "OPTIONS", "parse_network_args", "__version__"]
