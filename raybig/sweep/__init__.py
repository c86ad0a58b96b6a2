"""Hyperparameter sweeps: Ray Tune over full raybig runs (see driver.py)."""
