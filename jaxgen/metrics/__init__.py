"""Evaluation metrics and the feature networks jaxgen trains for offline evaluation."""
