"""Calibration: attention statistics, method searches, the FLOPs model, the recipe schema,
and the PyTorch reference of a recipe."""
