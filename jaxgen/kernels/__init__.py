"""Custom kernels (Pallas) with XLA fallbacks."""

from jaxgen.kernels.ca_depthwise_conv import ca_depthwise_conv

__all__ = ["ca_depthwise_conv"]
