"""Model zoo. Importing this package registers every model module in `jaxgen.registry.MODELS`."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
