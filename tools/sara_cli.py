#!/usr/bin/env python
"""`sara` without installing the package: python tools/sara_cli.py <command> ... (see docs/cli.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sara_network.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
