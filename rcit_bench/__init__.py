"""rcit-bench: image-text matching under image corruption, as a PyTorch Lightning benchmark suite."""

__version__ = "0.1.0"
