"""Orbax checkpoints of (train state, data-iterator state, config) under `WORKDIR/checkpoints`.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written step that looks finished. Restoring walks back from the
newest step when one is unreadable and says so; it never silently starts from scratch.
Process 0 prints `checkpoint: step N complete in DIR` once a step is in place (an async save:
at the first `announce` after it landed), so a log shows where a rerun would resume.
"""

import json
import os
import sys
from typing import Any, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxgen.errors import CheckpointError


class Checkpointer:
  """Saves and restores train state, the data iterator's state and the config."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    # cleanup_tmp_directories: a save killed half-way (SIGKILL, lost VM) leaves only a
    # `<step>.orbax-checkpoint-tmp-*` directory, never a step; it is deleted on the next start.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "data", "config"))
    self._unannounced: Optional[int] = None  # Saved step not yet reported complete.

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: Any, config: ml_collections.ConfigDict,
           force: bool = False) -> bool:
    if self._unannounced is not None:
      self.wait()  # Orbax waits for the previous save anyway; report it first.
    saved = self.manager.save(
        step, force=force,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(config.to_json()))))
    if saved:
      self._unannounced = step
      self.announce()
    return saved

  def announce(self) -> None:
    """Reports the last saved step once it is complete on disk (cheap; call after each step)."""
    if self._unannounced is None or self.manager.is_saving_in_progress():
      return
    step, self._unannounced = self._unannounced, None
    if jax.process_index() == 0:
      print(f"checkpoint: step {step} complete in {self.directory}", flush=True)

  def restore(self, abstract_state, step: Optional[int] = None) -> Tuple[Any, Any, int]:
    """Restores `step` (default: newest readable). Returns (state, data_state, step).

    `abstract_state` (shapes, dtypes, shardings) fixes where the arrays land. A corrupt newest
    step falls back to the previous one with a warning; if none is readable, CheckpointError.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    errors = []
    for s in steps:
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                       data=ocp.args.JsonRestore()))
        if errors:
          print(f"warning: checkpoint(s) {', '.join(e[0] for e in errors)} unreadable; "
                f"resumed from step {s}", file=sys.stderr)
        return restored["state"], restored["data"], s
      except Exception as e:  # pylint: disable=broad-except
        errors.append((str(s), f"{type(e).__name__}: {str(e)[:300]}"))
    detail = "; ".join(f"step {s}: {msg}" for s, msg in errors)
    raise CheckpointError(
        f"no readable checkpoint in {self.directory} ({detail}). The checkpoint is corrupt or "
        "was written by a different config; restore it from a backup or use a new --workdir.")

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def wait(self):
    self.manager.wait_until_finished()
    self.announce()

  def close(self):
    self.wait()
    self.manager.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) of a pytree, the target layout for a restore."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
