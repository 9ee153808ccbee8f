"""The entropy-gated length curriculum as a pure state machine (no arrays, no I/O).

Training runs in stages of `stage_steps` steps at lengths L_0 < L_1 < ... At the end of stage m (trained at
L_m) the caller measures H_m, the student's mean per-token entropy on held-out prompts, and calls `decide`:

- H_m >= h_min: L_m is stable. Advance to L_{m+1} ("advance"), or stay at L_m if it is the last length
  ("complete").
- H_m <  h_min: training at L_m pushed the entropy below the floor, so L_m is NOT stable. Fall back to the last
  stable length, the length of the last stage whose check passed, L_{m-1} (L_0 when stage 0 fails: nothing
  shorter exists), and hold there for the remaining steps ("fall_back").
- Once held, the length never changes again; later stage ends only record their entropy ("held").

Why fall back rather than stay at L_m: the paper advances "only while H_m >= H_min, else stay at the last stable
length"; a length whose own check failed is the unstable one, and keeping it would let entropy keep collapsing.

`step` counts completed optimizer steps (the loop's `step + 1`); stage m ends at step (m + 1) * stage_steps,
and the last check is at len(lengths) * stage_steps. Steps after that train at `length_at(state, config)`.
The state is a frozen dataclass; `to_dict`/`from_dict` make it JSON for the checkpoint's `meta` dict.
"""

import dataclasses
import math
import numbers

from kldistill_jax.errors import UserError

ADVANCE, COMPLETE, FALL_BACK, HELD = "advance", "complete", "fall_back", "held"


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
  """Stage lengths (strictly increasing), steps per stage, and the entropy floor h_min (nats per token)."""
  lengths: tuple[int, ...]
  stage_steps: int
  h_min: float

  def __post_init__(self):
    lengths = tuple(self.lengths)
    if not lengths or not all(_is_int(n) and n > 0 for n in lengths):
      raise UserError(f"curriculum.lengths must be a non-empty tuple of positive ints, got {self.lengths!r}")
    if any(a >= b for a, b in zip(lengths, lengths[1:])):
      raise UserError(f"curriculum.lengths must be strictly increasing, got {lengths}")
    if not _is_int(self.stage_steps) or self.stage_steps < 1:
      raise UserError(f"curriculum.stage_steps must be an int >= 1, got {self.stage_steps!r}")
    if not isinstance(self.h_min, numbers.Real) or not self.h_min >= 0 or math.isinf(self.h_min):
      raise UserError(f"curriculum.h_min must be a finite number >= 0, got {self.h_min!r}")
    # A frozen dataclass normalises through object.__setattr__; a list from a config becomes a tuple.
    object.__setattr__(self, "lengths", tuple(int(n) for n in lengths))
    object.__setattr__(self, "stage_steps", int(self.stage_steps))
    object.__setattr__(self, "h_min", float(self.h_min))


@dataclasses.dataclass(frozen=True)
class Decision:
  """One stage end: the stage that ended, the length it trained at, H_m, the decision and the length next."""
  stage: int
  length: int
  entropy: float
  decision: str
  next_length: int


@dataclasses.dataclass(frozen=True)
class CurriculumState:
  """`stage` indexes config.lengths (the length trained now); `held` is final; `history` has every decision."""
  stage: int = 0
  held: bool = False
  history: tuple[Decision, ...] = ()

  def to_dict(self) -> dict:
    return {"stage": self.stage, "held": self.held,
            "history": [dataclasses.asdict(d) for d in self.history]}

  @classmethod
  def from_dict(cls, data: dict) -> "CurriculumState":
    return cls(stage=int(data["stage"]), held=bool(data["held"]),
               history=tuple(Decision(**d) for d in data["history"]))


def length_at(state: CurriculumState, config: CurriculumConfig) -> int:
  """The training length for the steps after the state's last decision."""
  return config.lengths[state.stage]


def is_stage_end(step: int, config: CurriculumConfig) -> bool:
  """Whether `step` completed steps end a stage (so `decide` is due); never after the last stage."""
  return step > 0 and step % config.stage_steps == 0 and step <= len(config.lengths) * config.stage_steps


def _transition(state: CurriculumState, passed: bool, num_stages: int) -> tuple[int, bool, str]:
  """(next stage index, held, decision) after the current stage's check."""
  if state.held:
    return state.stage, True, HELD
  if not passed:
    # Unheld, the stage index equals the number of checks so far, so stage - 1 is the last one that passed.
    return max(state.stage - 1, 0), True, FALL_BACK
  if state.stage + 1 < num_stages:
    return state.stage + 1, False, ADVANCE
  return state.stage, False, COMPLETE


def decide(state: CurriculumState, measured_entropy: float,
           config: CurriculumConfig) -> tuple[CurriculumState, Decision]:
  """The state after the current stage's end, given H_m (mean per-token entropy on held-out prompts)."""
  num_stages = len(config.lengths)
  ended = len(state.history)
  if ended >= num_stages:
    raise ValueError(f"all {num_stages} curriculum stages have been decided; decide was called once too often")
  entropy = float(measured_entropy)
  if not math.isfinite(entropy):
    # A NaN would silently fail the check and hold the curriculum; a broken evaluation should stop the run.
    raise ValueError(f"measured entropy must be finite, got {entropy}")
  stage, held, kind = _transition(state, entropy >= config.h_min, num_stages)
  decision = Decision(stage=ended, length=length_at(state, config), entropy=entropy, decision=kind,
                      next_length=config.lengths[stage])
  return CurriculumState(stage=stage, held=held, history=state.history + (decision,)), decision
