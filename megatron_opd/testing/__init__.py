"""Test utilities shipped with the package (multi-process harness, tiny configs)."""
