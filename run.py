"""Entry point: python run.py --config configs/<name>.py[:preset] [--workdir DIR] [--config.x=y ...]."""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from kldistill_jax import jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("JAX %s on %d process(es), devices: %s", jax.__version__, jax.process_count(),
               jax.devices())
  jobs.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
