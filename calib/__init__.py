"""Calibration: the methods by name (methods.py) with their options and searches, attention
statistics, MoD routers, and the PyTorch reference of a recipe."""
