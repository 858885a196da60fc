"""Pretraining on DeepSpeed: engine set-up, the loop, checkpoints, reporting."""
