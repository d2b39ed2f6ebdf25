"""Model resolution: built-in model names, local Hugging Face directories, supported architectures."""
