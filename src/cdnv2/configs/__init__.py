"""Hydra config tree shipped with the package (configs/ at the repo root links here)."""
