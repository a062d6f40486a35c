"""Batch image classification harness: a folder of images in, the challenge's predictions CSV out."""

__version__ = "0.3.0"
