"""The registry: devices, parameter sets, drift events, detector checkpoints, labels, audit log."""
