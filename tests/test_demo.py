"""The README quick start's main job, in its short mode, so it cannot rot."""
import subprocess
import sys

from sara_network.fileformat import load_native, read_tensors


def test_demo_quick_mode_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "sara_network.demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "trainable parameters:" in result.stdout and "before" in result.stdout
    deltas, metadata = load_native(str(out / "digits_bold_sara.safetensors"))
    assert deltas and metadata["sara_format_version"] == "1"
    lora, _ = read_tensors(str(out / "digits_bold_lora.safetensors"))
    assert any(key.endswith(".lora_down.weight") for key in lora)
    with open(out / "before_after.png", "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"
