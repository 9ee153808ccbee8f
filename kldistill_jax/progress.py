"""Progress bars (tqdm) on process 0 only: training steps and evaluation batches.

The first step of a jitted loop compiles, often for longer than many later steps take; an ETA that counts
it is wrong for the whole run. So a bar says "compiling..." until its first unit is done, then restarts
its clock (`compiled`): the rate and ETA come from the steps that follow.
"""

import jax


def bar(total, desc, *, initial=0, leave=True):
  """A tqdm bar on process 0 that says "compiling..." until `compiled`; None elsewhere or without tqdm."""
  if jax.process_index() != 0:
    return None
  try:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  progress = tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0,
                       leave=leave)
  progress.set_postfix_str("compiling...")
  return progress


def compiled(progress):
  """Restarts `progress`'s clock after its first (compiling) unit: rate and ETA exclude compilation."""
  if progress is None:
    return
  done = progress.n
  progress.reset()  # n = 0, new start time, empty rate averages
  progress.n = progress.initial = progress.last_print_n = done
  progress.refresh()
