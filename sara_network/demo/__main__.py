"""`python -m sara_network.demo`: the quick-start job (see finetune.py)."""
from .finetune import main

main()
