"""Benchmarks: jaxgen models against equivalent PyTorch networks (not part of the library)."""
