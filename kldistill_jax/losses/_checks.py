"""Argument validation shared by every loss: errors name the argument and the shapes involved.

Checks run at trace time on static shapes, and on hyper-parameters only when they are concrete Python or
NumPy numbers (a traced `lam` from a schedule cannot be inspected without a host sync, so it is trusted).
Hyper-parameter checks raise `errors.UserError` (a `ValueError` that `run.py` reports in one line: those
values come from a config); shape checks raise `ValueError` (in a run, a wrong shape is a bug).
"""

import numbers

import jax
import numpy as np

from kldistill_jax.errors import UserError

REDUCTIONS = ("mean", "sum", "none")


def _concrete(value):
  """Returns `value` as a Python float when it is known at trace time, else None."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Number) or np.ndim(value) == 0:
    try:
      return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
      return None
  raise ValueError(f"expected a scalar, got an array of shape {np.shape(value)}")


def check_logits_pair(student_logits, teacher_logits):
  if student_logits.ndim < 1:
    raise ValueError(f"student_logits must have a vocabulary axis, got shape {student_logits.shape}")
  if student_logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(
        "vocabulary size mismatch: student_logits has V="
        f"{student_logits.shape[-1]} (shape {student_logits.shape}), teacher_logits has V="
        f"{teacher_logits.shape[-1]} (shape {teacher_logits.shape})")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"shape mismatch: student_logits {student_logits.shape} vs teacher_logits {teacher_logits.shape}")


def check_mask(mask, positions_shape, name="mask"):
  if mask is not None and tuple(mask.shape) != tuple(positions_shape):
    raise ValueError(
        f"{name} has shape {tuple(mask.shape)} but the positions have shape {tuple(positions_shape)} "
        "(the logits' shape without the vocabulary axis)")


def check_same_shape(name, array, reference_name, reference):
  if array is not None and tuple(array.shape) != tuple(reference.shape):
    raise ValueError(
        f"{name} has shape {tuple(array.shape)} but {reference_name} has shape {tuple(reference.shape)}")


def check_temperature(temperature):
  value = _concrete(temperature)
  if value is not None and not value > 0:
    raise UserError(f"temperature must be > 0, got {value}")


def check_in_range(name, value, low, high, *, low_open=False, high_open=False):
  """Checks low <= value <= high (or strict where *_open) when `value` is concrete."""
  v = _concrete(value)
  if v is None:
    return
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if below or above or v != v:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    raise UserError(f"{name} must be in {lo}{low}, {high}{hi}, got {v}")


def check_reduction(reduction, allowed=REDUCTIONS):
  if reduction not in allowed:
    raise UserError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_chunk_size(chunk_size):
  if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
    raise UserError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
