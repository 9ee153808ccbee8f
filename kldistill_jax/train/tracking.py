"""Optional Weights & Biases logging (`log.wandb_project`; off by default, and then `wandb` is never imported).

    run = tracking.start(config, workdir)   # None when log.wandb_project is empty or on processes > 0
    run.log(step, {"loss": 0.25, ...})        # the scalars metrics.jsonl and TensorBoard get
    run.log_files(images=[...], texts=[...])  # the study report's plots and report.md
    run.finish()

One W&B run per workdir that a loop writes metrics to (the distillation run, a fitted stage's `teacher/` or
`student_init/`, each run of a study), with the resolved config (as config.json records it). Its id is
derived from the workdir's absolute path, so a rerun that resumes the workdir resumes the same W&B run.
Every scalar is logged with the training step as its x-axis ("step", declared with `define_metric`), not
W&B's own counter: a resumed run redoes steps its dead predecessor already logged, which W&B's monotonic
step would drop. `WANDB_MODE=offline` (no network) and the other WANDB_* variables work as usual; W&B's
files go to `workdir/wandb/`.
"""

import hashlib
import pathlib

import jax

from kldistill_jax.train import workdir as workdir_lib


def run_id(workdir) -> str:
  """The W&B run id of `workdir`: stable across reruns of the same (absolute) path."""
  return hashlib.sha256(str(pathlib.Path(workdir).resolve()).encode()).hexdigest()[:16]


class WandbRun:
  """An open W&B run; only process 0 holds one."""

  def __init__(self, run, wandb):
    self._run, self._wandb = run, wandb

  @property
  def dir(self) -> pathlib.Path:
    return pathlib.Path(self._run.dir)

  def log(self, step: int, values: dict):
    self._run.log({"step": int(step), **{k: float(v) for k, v in values.items()}})

  def log_files(self, *, images=(), texts=(), base=None):
    """Images (e.g. report plots) as `wandb.Image`s under "plots/<name>", and text files (e.g. report.md)
    saved with the run (relative to `base`)."""
    if images:
      self._run.log({f"plots/{pathlib.Path(p).stem}": self._wandb.Image(str(p)) for p in images})
    for path in texts:
      self._run.save(str(path), base_path=None if base is None else str(base), policy="now")

  def finish(self):
    self._run.finish()


def start(config, workdir):
  """A `WandbRun` of `workdir` when config.log.wandb_project is set (process 0 only), else None."""
  log = config.get("log")
  if log is None or not log.wandb_project or jax.process_index() != 0:
    return None
  import wandb  # pylint: disable=g-import-not-at-top  (optional: imported only when asked for)
  workdir = pathlib.Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  run = wandb.init(project=log.wandb_project, entity=log.wandb_entity or None, group=log.wandb_group or None,
                   name=str(workdir), id=run_id(workdir), resume="allow", dir=str(workdir),
                   config=workdir_lib.resolved(config))
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return WandbRun(run, wandb)


def log_report(config, workdir, report_path):
  """The study report's plots (workdir/plots/*.png) and report.md in the W&B run of the study's workdir, when
  config.log.wandb_project is set; its runs each have their own W&B run (`start` in their loops)."""
  run = start(config, workdir)
  if run is None:
    return
  try:
    run.log_files(images=sorted((pathlib.Path(workdir) / "plots").glob("*.png")), texts=[report_path],
                  base=workdir)
  finally:
    run.finish()
