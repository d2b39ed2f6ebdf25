"""TensorRT in one place: parser checks, shape tensors, profiles, engine build and index, the runner, --verify."""
