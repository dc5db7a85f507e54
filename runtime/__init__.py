"""Shared training runtime: config, distributed environment, strategy, checkpoints, metrics, seeding."""
