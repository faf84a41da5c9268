"""Encoders, similarity heads, losses and the five matching methods (one file per method)."""
