"""Run by the webui before it loads the extension: make `sara_network` importable in its venv.

Installs from $SARA_NETWORK_SOURCE (a path, a wheel or a git URL), or from the sara-network
checkout this folder lives in when it was symlinked into extensions/.
"""
import importlib.util
import os
from pathlib import Path

import launch

if importlib.util.find_spec("sara_network") is None:
    checkout = Path(__file__).resolve().parents[3]
    source = os.environ.get("SARA_NETWORK_SOURCE") or (str(checkout) if (checkout / "setup.cfg").is_file() else "")
    if source:
        launch.run_pip(f'install "{source}"', "sara-network for the SaRA extension")
    else:
        print("[SaRA] sara_network is not installed: set SARA_NETWORK_SOURCE to the sara-network checkout "
              "(or pip install it into the webui venv) and restart; see the extension README")
