"""What `run.py` runs: `config.job` names one entry of `JOBS`, a function of (config, workdir)."""

import sys

import jax
from absl import logging

from kldistill_jax import errors, identities
from kldistill_jax.errors import UserError
from kldistill_jax.train import distributed, preemption, runner, study


def run_identities(config, workdir=None):
  """Prints both sides of every identity; returns False if one fails its tolerance."""
  del workdir  # nothing is written
  checks, monte_carlo = identities.all_checks(config)
  print(identities.format_table(checks, monte_carlo))
  # The discount-0 "gap" row is a measurement of the future terms, not an identity.
  failed = [c.name for c in checks if not c.name.startswith("gap") and c.relative_error > config.tolerance]
  if abs(monte_carlo["slope"] + 0.5) > config.mc.slope_tolerance:
    failed.append(f"Monte-Carlo slope {monte_carlo['slope']:.3f} is not -0.5 +- {config.mc.slope_tolerance}")
  print("\nall identities hold" if not failed else "\nFAILED:\n  " + "\n  ".join(failed))
  return not failed


JOBS = {"identities": run_identities, "distill": runner.run_distill, "grpo": runner.run_grpo,
        "pretrain": runner.run_pretrain, "study": study.run_study}


def run(config, workdir=None):
  if config.job not in JOBS:
    raise UserError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
  if "distributed" in config:
    distributed.initialize(config)  # before any other JAX call
  logging.info("JAX %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  with preemption.handling():  # SIGTERM / Ctrl-C: finish the step, save, stop (errors.Preempted)
    if not JOBS[config.job](config, workdir):
      sys.exit(1)


def exit_code(config, workdir=None, *, traceback=False) -> int:
  """`run`, as the command line reports it: 0 on success, 1 when a job reports failure, 2 after a user
  error (one line on stderr, `error: ...`; `traceback=True` re-raises it with its traceback), 128 + the
  signal number after a clean stop on SIGTERM / Ctrl-C. Bugs keep their traceback."""
  try:
    run(config, workdir)
  except errors.Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    return 128 + e.signum
  except errors.UserError as e:
    if traceback:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 1
  return 0
