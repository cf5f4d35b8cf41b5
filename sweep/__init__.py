"""Hyperparameter sweeps of core.train with Ray Tune and Optuna: ``python -m sweep.run --help``."""
