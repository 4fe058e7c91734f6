"""Rollout orchestration on the service side: serving blobs to devices, deployments."""
