"""Objectives, the train step and loop, checkpoints, sharding and run records."""
