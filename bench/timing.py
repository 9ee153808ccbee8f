"""Wall-clock timing shared by the benchmarks (run as `python bench/<name>.py`, so this imports as `timing`)."""

import statistics
import time


def median_seconds(fn, repeats, warmups=0):
  """Median wall time of `repeats` calls of fn() after `warmups` untimed calls; fn must block until done."""
  for _ in range(warmups):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
