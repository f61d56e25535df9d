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
