"""Hydra config tree shipped with the package (configs/ at the repo root is a link to here)."""
