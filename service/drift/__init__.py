"""Drift detection: per-device streaming detectors (layer A) and per-cohort windowed tests (layer B)."""
