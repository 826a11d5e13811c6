"""The job presets in presets/ stay valid: their network args parse with our strict parser."""
import glob
import os

import pytest
import toml

from sara_network.options import parse_network_args

PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "presets", "*.toml")))


def test_there_are_presets():
    assert len(PRESETS) >= 4


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_network_args_parse(path):
    sections = toml.load(path)
    flat = {k: v for section in sections.values() for k, v in section.items()}  # kohya flattens sections
    assert flat["network_module"] == "sara_network"
    parse_network_args(dict(arg.split("=", 1) for arg in flat["network_args"]))
