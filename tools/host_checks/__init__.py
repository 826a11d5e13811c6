"""Per-host checks for tools/check_in_host.py: each module has check(path, cases, report)."""
