"""XLA:CPU custom-call kernels and CPU-tuned formulations (optional plug-in)."""
