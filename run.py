"""Entry point: python run.py --config configs/<name>.py[:preset] [--workdir DIR] [--config.x=y ...]."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kldistill_jax import jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of a user error (for bug reports).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 brings it back
    logging.set_verbosity(logging.WARNING)
  sys.exit(jobs.exit_code(_CONFIG.value, _WORKDIR.value, traceback=_TRACEBACK.value))


if __name__ == "__main__":
  app.run(main)
