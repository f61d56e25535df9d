"""Tasks: what a config trains (diffusion, autoencoder, ...). Each module self-registers in TASKS.

A task owns the model and the objective; the trainer owns everything else (mesh, optimizer,
checkpoints, logging), so every model trains through the same loop.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
