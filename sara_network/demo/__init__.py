"""Tiny pretrained diffusion base for demos and benchmarks (optional extra: ``pip install sara-network[demo]``).

A 2.7M-parameter class-conditional ``UNet2DModel`` pretrained on sklearn digits 0-7 at 16x16, with digits 8 and 9
held out as the fine-tuning target. Import the submodules directly (``data``, ``model``, ``classifier``); this
package imports nothing heavy so the core package never depends on diffusers or scikit-learn.
"""

# The safetensors metadata entry of the base file (its training config and results, as JSON); the
# `sara` CLI recognises the demo base by it.
BASE_METADATA_KEY = "demo_base"
