"""The entropy-gated length curriculum on scripted entropy sequences."""

import json

import pytest

from kldistill_jax.train import curriculum as cur

CONFIG = cur.CurriculumConfig(lengths=(128, 256, 512, 1024), stage_steps=10, h_min=0.5)


def _run(entropies, config=CONFIG, total_steps=50, *, state=cur.CurriculumState(), start=0):
  """Drives the state machine like the loop would: (final state, training length of steps start+1..total)."""
  scripted = iter(entropies)
  lengths = []
  for step in range(start + 1, total_steps + 1):
    lengths.append(cur.length_at(state, config))
    if cur.is_stage_end(step, config):
      state, _ = cur.decide(state, next(scripted), config)
  return state, lengths


def _decisions(state):
  return [d.decision for d in state.history]


def test_entropy_always_above_reaches_the_last_length():
  state, lengths = _run([0.9, 0.8, 0.7, 0.6])
  assert _decisions(state) == ["advance", "advance", "advance", "complete"]
  assert lengths == [128] * 10 + [256] * 10 + [512] * 10 + [1024] * 20
  assert not state.held and cur.length_at(state, CONFIG) == 1024


def test_drop_at_stage_2_falls_back_to_the_last_stable_length_and_holds():
  # Stage 2 trained at 512 and failed, so 512 is unstable; 256 (stage 1, passed) is the last stable length.
  state, lengths = _run([0.9, 0.8, 0.3, 0.9])
  assert _decisions(state) == ["advance", "advance", "fall_back", "held"]
  assert lengths == [128] * 10 + [256] * 10 + [512] * 10 + [256] * 20
  assert state.held and cur.length_at(state, CONFIG) == 256


def test_below_at_the_first_check_holds_the_first_length():
  state, lengths = _run([0.1, 0.9, 0.9, 0.9])
  assert _decisions(state) == ["fall_back", "held", "held", "held"]
  assert lengths == [128] * 50 and state.held


def test_drop_at_the_last_stage_falls_back():
  state, lengths = _run([0.9, 0.9, 0.9, 0.2])
  assert _decisions(state) == ["advance", "advance", "advance", "fall_back"]
  assert lengths[-10:] == [512] * 10


def test_entropy_equal_to_h_min_passes():
  state, _ = cur.decide(cur.CurriculumState(), 0.5, CONFIG)
  assert state.stage == 1 and not state.held


@pytest.mark.parametrize("entropy, decision, held", [(0.7, "complete", False), (0.2, "fall_back", True)])
def test_single_stage(entropy, decision, held):
  config = cur.CurriculumConfig(lengths=(64,), stage_steps=5, h_min=0.5)
  state, lengths = _run([entropy], config, total_steps=12)
  assert _decisions(state) == [decision] and state.held == held
  assert lengths == [64] * 12


def test_every_decision_is_recorded_with_its_entropy():
  entropies = [0.9, 0.8, 0.3, 0.95]
  state, _ = _run(entropies)
  assert [d.entropy for d in state.history] == entropies
  assert [d.stage for d in state.history] == [0, 1, 2, 3]
  assert [d.length for d in state.history] == [128, 256, 512, 256]
  assert [d.next_length for d in state.history] == [256, 512, 256, 256]


def test_decide_returns_the_recorded_decision():
  state, decision = cur.decide(cur.CurriculumState(), 0.25, CONFIG)
  assert decision == state.history[-1] == cur.Decision(stage=0, length=128, entropy=0.25,
                                                       decision="fall_back", next_length=128)


def test_json_round_trip_and_resume():
  uninterrupted, all_lengths = _run([0.9, 0.8, 0.3, 0.9])
  assert cur.CurriculumState.from_dict(json.loads(json.dumps(uninterrupted.to_dict()))) == uninterrupted
  state, first = _run([0.9, 0.8], total_steps=20)
  restored = cur.CurriculumState.from_dict(json.loads(json.dumps(state.to_dict())))
  assert restored == state
  resumed, rest = _run([0.3, 0.9], state=restored, start=20)
  assert resumed == uninterrupted and first + rest == all_lengths


def test_is_stage_end():
  ends = [step for step in range(0, 60) if cur.is_stage_end(step, CONFIG)]
  assert ends == [10, 20, 30, 40]


def test_decide_after_the_last_stage_raises():
  state, _ = _run([0.9] * 4, total_steps=40)
  with pytest.raises(ValueError, match="all 4 curriculum stages"):
    cur.decide(state, 0.9, CONFIG)


def test_non_finite_entropy_raises():
  with pytest.raises(ValueError, match="finite"):
    cur.decide(cur.CurriculumState(), float("nan"), CONFIG)


def test_config_normalises_a_list():
  config = cur.CurriculumConfig(lengths=[8, 16], stage_steps=3, h_min=1)
  assert config.lengths == (8, 16) and config.h_min == 1.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(lengths=()), "curriculum.lengths"),
    (dict(lengths=(128, 128)), "curriculum.lengths"),
    (dict(lengths=(256, 128)), "curriculum.lengths"),
    (dict(lengths=(0, 128)), "curriculum.lengths"),
    (dict(lengths=(64.0, 128)), "curriculum.lengths"),
    (dict(stage_steps=0), "curriculum.stage_steps"),
    (dict(stage_steps=2.5), "curriculum.stage_steps"),
    (dict(h_min=-0.1), "curriculum.h_min"),
    (dict(h_min=float("nan")), "curriculum.h_min"),
])
def test_invalid_config_names_the_field(kwargs, field):
  base = dict(lengths=(128, 256), stage_steps=10, h_min=0.5)
  with pytest.raises(ValueError, match=field):
    cur.CurriculumConfig(**{**base, **kwargs})
