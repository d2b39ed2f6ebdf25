"""Torch-free formats every layer shares: recipe, FLOPs model, model geometry, bundle manifest, image config."""
