"""diffgen: train and sample class-conditional diffusion models for small images."""

__version__ = "0.1.0"
