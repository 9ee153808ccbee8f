"""Errors that are the user's to fix (a config value, a file, a workdir), as opposed to bugs.

`run.py` prints a `UserError` as one line and exits 2; anything else keeps its traceback. `UserError`
subclasses `ValueError`, so code that catches `ValueError` around a config check keeps working.
"""


class UserError(ValueError):
  """A bad config value, missing or malformed file, incompatible models, or an unusable workdir."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory a config names does not exist (a `FileNotFoundError` too)."""


class UnreadableFileError(UserError, PermissionError):
  """A file or directory a config names cannot be read (a `PermissionError` too)."""


class NotADirectoryUserError(UserError, NotADirectoryError):
  """A path a config names as a directory is a file (a `NotADirectoryError` too)."""


class ConfigMismatchError(UserError):
  """A rerun's config changes what the run in its workdir trains (objective, models, data, optimizer)."""


class WorkdirInUseError(UserError):
  """Another live run holds the workdir."""


class CheckpointMismatchError(UserError):
  """A checkpoint's tree (structure, shapes, dtypes) differs from the state the current config builds."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint could not be read for a reason other than damage (I/O after retries, memory)."""


class Preempted(Exception):
  """The run was asked to stop (SIGTERM, Ctrl-C) and saved a checkpoint of the step in flight first."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
