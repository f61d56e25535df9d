"""Building blocks shared by every jaxgen model (one home per layer)."""
