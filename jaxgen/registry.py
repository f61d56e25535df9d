"""Name -> constructor registries, so configs build models (and tasks) by name."""

from typing import Callable, Dict, TypeVar

from jaxgen.errors import ConfigError

T = TypeVar("T")


class Registry:
  """A named table of constructors: `@MODELS.register("unet")`, then `MODELS.get("unet")`."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Callable] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def add(fn: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} registered twice")
      self._entries[name] = fn
      return fn
    return add

  def get(self, name: str) -> Callable:
    _import_builtin_modules()
    if name not in self._entries:
      raise ConfigError(
          f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}. "
          f"Fix the config's {self.kind} name.")
    return self._entries[name]

  def names(self):
    _import_builtin_modules()
    return sorted(self._entries)


MODELS = Registry("model")
TASKS = Registry("task")  # What is trained: diffusion, autoencoder, ...


def _import_builtin_modules():
  # Importing a model or task module registers it; import lazily to keep `import jaxgen` light.
  import jaxgen.models  # noqa: F401  pylint: disable=g-import-not-at-top
  import jaxgen.tasks  # noqa: F401  pylint: disable=g-import-not-at-top
