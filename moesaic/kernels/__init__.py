"""Device-specific kernels behind the portable expert path (``moesaic.kernels.cpu``)."""
