"""Drift detection: per-device streaming detectors (layer A), per-cohort windowed tests (B)."""
