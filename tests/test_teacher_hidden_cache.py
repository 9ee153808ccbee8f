"""The exact teacher cache from hidden states (teacher_cache.hidden_states): the first step's loss of a run
on the cache is the live teacher's to the bfloat16 rounding of the stored states (a bound derived below),
the stored states and head are the teacher's, the run needs no teacher forward and not the teacher itself,
its FLOP counters say so, the bytes per token are the hand-computed ones, and mismatched settings are
refused with the field named."""

import gc
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config_files
from kldistill_jax import data, objectives, sampling
from kldistill_jax.train import flops, runner, setup, step, teacher_states, trajectories
from kldistill_jax.train import state as state_lib

STEPS, LAM = 3, 0.5


def _config(**overrides):
  """The sft smoke run (teacher prefixes, exact estimator) with the mixed KL on a hidden-state cache."""
  base = config_files.load("sft", "smoke")
  defaults = {"student.warmup_steps": 0, "eval.temperature": base.sampling.temperature, "steps": STEPS,
              "checkpoint_every": STEPS, "teacher_cache.enabled": True, "teacher_cache.hidden_states": True,
              "objective.kl": "mixed", "objective.lam": LAM}
  return config_files.load("sft", "smoke", **{**defaults, **overrides})


# ----------------------------------------------------------------------------- bytes per token

def test_bytes_per_token_by_hand():
  qwen3_4b = teacher_states.bytes_per_token(hidden_size=2560, vocab_size=151_936, top_k=20)
  assert qwen3_4b == {"hidden_states": 2560 * 2, "top_k": 20 * (4 + 4), "logits": 151_936 * 2, "rows": 20}
  assert round(100 * qwen3_4b["hidden_states"] / qwen3_4b["logits"], 2) == 1.68  # D / V


def test_head_round_trips_in_its_dtype(tmp_path):
  """A bfloat16 head (numpy has no bfloat16 .npy) and a float32 one come back bit for bit, on the mesh."""
  mesh = setup.make_mesh(_config())
  for dtype in (jnp.bfloat16, jnp.float32):
    head = jax.random.normal(jax.random.key(0), (16, 40)).astype(dtype)
    teacher = type("Teacher", (), {"output_head": lambda self, head=head: head})()
    file = tmp_path / jnp.dtype(dtype).name / "head.npy"
    loaded = teacher_states.load_head(file, teacher_states.write_head(file, teacher), mesh)
    assert loaded.dtype == dtype and loaded.sharding.mesh == mesh
    np.testing.assert_array_equal(np.asarray(loaded).view(np.uint8), np.asarray(head).view(np.uint8))


# ----------------------------------------------------------------------------- config and cache checks

@pytest.mark.parametrize("overrides,match", [
    ({"teacher_cache.enabled": False}, r"teacher_cache\.hidden_states=True needs teacher_cache\.enabled=True"),
    ({"objective.estimator": "sampled", "objective.kl": "reverse", "objective.lam": None},
     r"teacher_cache\.hidden_states=True serves objective\.estimator='exact'"),
    ({"teacher_cache.top_k": 4, "objective.kl": "forward", "objective.lam": None},
     r"teacher_cache\.hidden_states=True gives the exact KL; teacher_cache\.top_k=4")])
def test_check_teacher_cache(overrides, match):
  config = _config(**overrides)
  with pytest.raises(ValueError, match=match):
    setup.check_teacher_cache(config, setup.make_objective(config))


@pytest.mark.parametrize("built,asked", [(None, True), (False, True), (True, False)])
def test_cache_built_with_other_hidden_states_is_refused(tmp_path, built, asked):
  """None: a cache from before the setting existed (built without hidden states)."""
  info = {k: v for k, v in {"num_trajectories": 24, "hidden_states": built}.items() if v is not None}
  (tmp_path / trajectories.INFO).write_text(json.dumps(info))
  recorded = bool(built)
  with pytest.raises(ValueError, match=rf"teacher_cache\.hidden_states={asked} but the cache at {tmp_path} "
                                       rf"was built with hidden_states={recorded}"):
    trajectories.build(None, None, None, _config(**{"teacher_cache.hidden_states": asked}), tmp_path, mesh=None)


# ----------------------------------------------------------------------------- the run

@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One run through the runner; spies record whether the teacher outlived the cache build."""
  workdir = tmp_path_factory.mktemp("hidden")
  seen = {}
  build, train_stage = trajectories.build, runner.train_stage

  def spy_build(teacher, *args, **kwargs):
    seen["teacher"] = weakref.ref(teacher)
    return build(teacher, *args, **kwargs)

  def spy_train_stage(*args, **kwargs):
    gc.collect()
    seen.update(teacher_alive=seen["teacher"]() is not None, stage_teacher=kwargs["teacher"],
                stage_head=kwargs["teacher_head"])
    return train_stage(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trajectories, "build", spy_build)
    patch.setattr(runner, "train_stage", spy_train_stage)
    runner.run_distill(_config(), workdir)
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return workdir, metrics, seen


@pytest.fixture(scope="module")
def first_step(run):
  """Step 1 recomputed outside the run: its batch from the cache, the initial student and the live teacher
  as run_distill loads them, the teacher's own hidden states and logits, and the loss on the cache."""
  workdir, _, _ = run
  config = _config()
  mesh = setup.make_mesh(config)
  vocab = data.load_tokenizer(config.data.tokenizer).vocab_size
  teacher = setup.load_model(config.teacher, "teacher", vocab, mesh, config.seed + 1)
  student = setup.load_model(config.student, "student", vocab, mesh, config.seed + 2)
  rows = trajectories.TrajectorySource(workdir / "trajectories")
  batch = {k: jnp.asarray(np.stack([rows[i][k] for i in range(config.batch_size)]))
           for k in trajectories.KEYS + trajectories.HIDDEN_KEYS}
  objective = setup.make_objective(config)
  split = state_lib.split(student)
  frozen = state_lib.Split(split.graphdef, None, split.rest)

  @jax.jit  # one program: one compilation
  def recompute(params, teacher, head, batch):
    def loss(batch, teacher, fused=True):
      return step.loss_and_metrics(params, batch, teacher, student=frozen, objective=objective, fused=fused)
    live_batch = {k: v for k, v in batch.items() if k != step.TEACHER_HIDDEN}
    model, teacher_model = frozen.merge(params), teacher.merge()
    tokens, mask = batch["tokens"], batch["attention_mask"]
    positions = sampling.prompt_positions(mask)
    t_hidden, _ = teacher_model(tokens, positions, None, mask, return_hidden=True)
    s_hidden, _ = model(tokens, positions, None, mask, return_hidden=True)
    rounded = objectives.compute_from_hidden(objective, s_hidden, model.output_head(),
                                             t_hidden.astype(jnp.bfloat16).astype(jnp.float32),
                                             teacher_model.output_head(), batch)
    return dict(cached=loss(batch, head), live=loss(live_batch, teacher), unfused=loss(batch, head, False),
                rounded=rounded, t_hidden=t_hidden, s_logits=model(tokens, positions, None, mask)[0],
                teacher_head=teacher_model.output_head())

  head = trajectories.teacher_head(workdir / "trajectories", mesh)
  out = recompute(split.params, state_lib.split(teacher), head, batch)
  return dict(out, batch=batch, head=head, config=config, teacher_config=teacher.config)


def test_cache_holds_the_teachers_states_and_head(first_step):
  s = first_step
  np.testing.assert_array_equal(np.asarray(s["head"]), np.asarray(s["teacher_head"]))  # float32, exact
  stored = np.asarray(s["batch"][step.TEACHER_HIDDEN])
  assert stored.dtype == jnp.bfloat16 and stored.shape == s["t_hidden"].shape
  # bfloat16 keeps 8 significant bits: round to nearest is within 2^-9 relative. The build's forward (on 8
  # simulated devices) and this one are separate float32 programs, so allow twice that plus float32 noise.
  live = np.asarray(s["t_hidden"])
  np.testing.assert_allclose(stored.astype(np.float32), live, rtol=2 ** -8, atol=1e-5 * np.abs(live).max())
  rounded = np.asarray(s["t_hidden"].astype(jnp.bfloat16))
  assert np.mean(stored == rounded) > 0.999  # and nearly always the very same rounding


def test_loss_on_the_cache_is_the_live_teachers_to_bf16_rounding(first_step):
  """Cached vs live, the tolerance derived from the rounding itself.

  The stored states h~ = bf16(h) move the teacher's logits by d = (h~ - h) W; a softmax ignores a shift, so
  every teacher log-prob moves by at most e = max(d) - min(d) at that position. Then, exactly (not to first
  order), |d KL(q||p)| = |sum q d log p| <= e, and KL(p~||q) - KL(p||q) = KL(p~||p) + sum (p~ - p) log(p/q)
  with KL(p~||p) <= e and |p~ - p| <= (exp(e) - 1) p, so |d KL(p||q)| <= e + (exp(e) - 1) E_p|log(p/q)|.
  The token mean of lam * the first + (1 - lam) * the second bounds the change of the loss.
  """
  s = first_step
  (cached, cached_metrics), (live, live_metrics) = s["cached"], s["live"]
  # The same computation on the live states rounded as the cache rounds them: float32 agreement.
  np.testing.assert_allclose(cached, s["rounded"][0], rtol=2e-5)
  np.testing.assert_allclose(cached, s["unfused"][0], rtol=2e-5)  # objective.fused=False: logits from states

  head = np.asarray(s["teacher_head"], np.float64)
  h = np.asarray(s["t_hidden"], np.float64)
  d = (np.asarray(s["batch"][step.TEACHER_HIDDEN]).astype(np.float64) - h) @ head
  e = (d.max(-1) - d.min(-1))[:, :-1]  # position t predicts token t + 1
  log_p = _log_softmax(h @ head)[:, :-1]
  log_q = _log_softmax(np.asarray(s["s_logits"], np.float64))[:, :-1]
  spread = np.sum(np.exp(log_p) * np.abs(log_p - log_q), -1)
  bound_per_token = LAM * e + (1 - LAM) * (e + np.expm1(e) * spread)
  weights = np.asarray(s["batch"]["loss_mask"])[:, 1:]
  bound = np.sum(bound_per_token * weights) / weights.sum()
  assert 0 < bound < 0.05 * float(live)  # a tolerance that still tells a wrong teacher apart
  assert abs(float(cached) - float(live)) <= bound
  for name in ("forward_kl", "reverse_kl", "teacher_entropy", "student_entropy", "num_tokens"):
    np.testing.assert_allclose(cached_metrics[name], live_metrics[name], rtol=0.05, err_msg=name)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_run_trains_on_the_cache_without_the_teacher(run, first_step):
  workdir, metrics, seen = run
  assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(metrics[0]["loss"], first_step["cached"][0], rtol=1e-5)  # step 1, on the mesh
  assert all(np.isfinite(m["loss"]) for m in metrics)
  # No teacher forward during training: only its head, held by the step; the teacher itself was freed.
  assert seen["stage_teacher"] is None and seen["stage_head"].shape == (128, 40)
  assert not seen["teacher_alive"]


def test_flops_count_the_head_only(run, first_step):
  workdir, metrics, _ = run
  config, batch = first_step["config"], first_step["batch"]
  info = json.loads((workdir / "trajectories" / trajectories.INFO).read_text())
  b, length = batch["tokens"].shape
  head_flops = flops.head_flops(b * length, 128, 40)
  assert head_flops == 2 * 8 * 24 * 128 * 40
  for i, m in enumerate(metrics, 1):
    assert m["teacher_scoring_flops"] == i * head_flops  # the head per step, never a forward
    assert m["teacher_generation_flops"] == info["teacher_flops"]  # the build, once
  # The build: each batch's sampling plus one forward to the final states (no head).
  teacher_config = first_step["teacher_config"]
  states = flops.forward_flops(teacher_config, b, length, lm_head=False)
  assert states == flops.forward_flops(teacher_config, b, length) - head_flops
  sampling_costs = {flops.generation_flops(teacher_config, b, config.data.prompt_len,
                                           config.sampling.max_new_tokens, decode_steps=n)
                    for n in range(config.sampling.max_new_tokens + 1)}
  shards = [json.loads((trajectories.shard_dir(workdir / "trajectories", 0, i) / trajectories.SHARD_INFO)
                       .read_text())["teacher_flops"] for i in range(STEPS)]
  assert all(shard - states in sampling_costs for shard in shards)
  assert sum(shards) == info["teacher_flops"]


def test_stored_bytes_per_token(run):
  workdir, _, _ = run
  sizes = teacher_states.bytes_per_token(hidden_size=128, vocab_size=40, top_k=4)
  assert trajectories.stored_bytes_per_token(workdir / "trajectories") == sizes["rows"] + sizes["hidden_states"]
  shard = trajectories.shard_dir(workdir / "trajectories", 0, 0)
  payload = sum(np.load(f, mmap_mode="r").nbytes for f in shard.glob("*.npy"))
  assert payload == 8 * 24 * (20 + 2 * 128)  # rows x tokens x (int32 x 3, float32 x 2, bfloat16 x 128)
