"""Datasets made by code (no downloads): ``shapes-vqa``. NumPy and Pillow only."""
