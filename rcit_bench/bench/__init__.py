"""Benchmark specs, runner, per-cell results store and leaderboard generation."""
