"""Sweeps on Ray Tune + Optuna: search spaces, sweep settings, the trial and its executors, the
driver, trial records, results (leaderboard, best config, importances, TensorBoard), layer
ablations and the dashboards."""
