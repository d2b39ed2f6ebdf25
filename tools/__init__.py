"""Tools above the runtime: bench, eval, report, demo, training of the packaged model."""
