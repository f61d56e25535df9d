"""Preemption: on SIGTERM the trainer finishes its step, saves a checkpoint and exits cleanly.

Cloud schedulers (Cloud TPU / GCE maintenance, Slurm `--signal`, Kubernetes) send SIGTERM some
time before killing a job. On one process a Python handler sets a flag that the loop polls
after each step. With several processes, all of them must stop at the same step, so the
decision comes from JAX's preemption sync point (`jax.distributed.initialize` installs the
SIGTERM notifier of the coordination service, which agrees on a step across hosts).

A SIGKILL cannot be caught: the next run resumes from the last complete checkpoint instead
(orbax renames a checkpoint into place only once it is fully written).
"""

import signal
from typing import Optional

import jax


class PreemptionGuard:
  """Context manager: `should_stop(step)` turns True once a SIGTERM has arrived."""

  def __init__(self):
    self.signal: Optional[int] = None
    self._previous = None
    self._multi = jax.process_count() > 1

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __enter__(self):
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
        self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def should_stop(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal = signal.SIGTERM
      except RuntimeError:  # No preemption service (distributed runtime without one).
        pass
    return self.signal is not None
