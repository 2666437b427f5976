"""Image embedding worker."""
