"""Optional backend-specific kernels; the core never imports them."""
