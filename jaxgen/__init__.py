"""jaxgen: efficient image generation (DC-AE, CAN/CaT, DiT, U-Net, LDM, FastComposer) in JAX/Flax."""

__version__ = "0.1.0"
