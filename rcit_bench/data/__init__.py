"""Datasets (synthetic, Karpathy JSON, Hugging Face), corruptions, text perturbations and the DataModule."""
