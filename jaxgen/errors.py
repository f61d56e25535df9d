"""User-facing errors: each names the problem and the fix; `jaxgen.main` prints them and exits 2."""


class JaxgenError(Exception):
  """An error caused by the user's input (config, data, checkpoint), not by a bug."""


class ConfigError(JaxgenError):
  """The config is invalid: unknown key, impossible shape, bad value."""


class DataError(JaxgenError):
  """A dataset is missing, unprepared or unreadable."""


class CheckpointError(JaxgenError):
  """A checkpoint is unreadable, corrupt or does not match the config."""


class WeightsError(JaxgenError):
  """Converted weights are missing tensors or have mismatched shapes."""


class NonFiniteLossError(JaxgenError):
  """Training produced a NaN or inf loss."""


def cli(main):
  """Wraps a command's `main(argv)`: argv defaults to sys.argv[1:]; a JaxgenError prints one
  `error:` line and returns 2 (the exit code of every jaxgen command on bad input)."""
  import functools  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  @functools.wraps(main)
  def wrapped(argv=None) -> int:
    try:
      return main(sys.argv[1:] if argv is None else argv) or 0
    except JaxgenError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 2
  return wrapped
