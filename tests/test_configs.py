"""The 2x2 and mixed-KL configs run end to end (`:smoke` presets, in-process, 8 simulated devices)."""

import json

import jax
import pytest

import config_files
from kldistill_jax import data
from kldistill_jax.models import hf
from kldistill_jax.train import flops, presets, runner, setup

CELLS = ("sft", "dagger", "offline_rl", "opd", "kl_mix")
METRICS = ("loss", "forward_kl", "reverse_kl", "student_entropy", "teacher_entropy", "response_length",
           "truncation_rate", "tokens_per_s", "step_time_s", "student_flops", "teacher_flops")


def _config(name, arg="smoke"):
  config = config_files.load(name, arg)
  # No student fitting stage, and evaluation sampling like training: fewer compiles per run (they
  # dominate); the distillation run is what is tested here.
  config.student.warmup_steps = 0
  config.eval.temperature = config.sampling.temperature
  return config


def _student_checkpoint(config, path):
  """The configs' inline student, initialised once and saved: each run then loads it instead of
  compiling its own initialiser (about 3 s per run on 2 cores)."""
  mesh, vocab = setup.make_mesh(config), data.load_tokenizer(config.data.tokenizer).vocab_size
  with jax.set_mesh(mesh):
    model = setup.load_model(config.student, "student", vocab, mesh, config.seed + 2)
  hf.save(model, path)
  return str(path)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
  return _student_checkpoint(_config(CELLS[0]), tmp_path_factory.mktemp("student") / "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, student):
  """name -> (config, results.json, metrics.jsonl rows) for every smoke run (shared: compiles dominate)."""
  out = {}
  for name in CELLS:
    config, workdir = _config(name), tmp_path_factory.mktemp(name)
    config.student.path = student
    runner.run_distill(config, workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    out[name] = (config, json.loads((workdir / "results.json").read_text()), rows)
  return out


@pytest.mark.parametrize("name", CELLS)
def test_smoke_run_writes_results_and_metrics(runs, name):
  config, results, rows = runs[name]
  assert config.batch_size % 8 == 0 and config.steps == 2
  for row in ("teacher", "student before", "student after"):
    assert 0.0 <= results[row]["accuracy"] <= 1.0 and results[row]["num_problems"] == config.eval.num_problems
  assert [r["step"] for r in rows] == [1, 2]
  for key in METRICS:
    assert key in rows[-1], key
  assert rows[-1]["teacher_flops"] > 0 and rows[-1]["student_flops"] > 0
  assert results["flops"]["teacher_flops"] == rows[-1]["teacher_flops"]
  # eval: the probes' (logged with the training metrics), then the three evaluations'
  evaluations = sum(results[row]["flops"] for row in ("teacher", "student before", "student after"))
  assert evaluations > 0 and results["flops"]["eval_flops"] == rows[-1]["eval_flops"] + evaluations


@pytest.mark.parametrize("on_policy, off_policy", [("opd", "offline_rl"), ("dagger", "sft")])
def test_student_prefixes_count_generation_flops(runs, on_policy, off_policy):
  """Same shapes and steps: student prefixes add the student's sampling, teacher prefixes the teacher's."""
  on, off = runs[on_policy][1]["flops"], runs[off_policy][1]["flops"]
  assert on["student_flops"] > off["student_flops"]
  assert off["teacher_flops"] > on["teacher_flops"]
  # The differences are exactly each sampler's generation FLOPs, step by step (decode steps = max length).
  config = runs[on_policy][0]
  generation = lambda name, model: sum(
      flops.generation_flops(model, config.batch_size, config.data.prompt_len, config.sampling.max_new_tokens,
                             decode_steps=int(row["max_length"]))
      for row in runs[name][2])
  student, teacher = hf.read_config(config.student.path), hf.read_config(config.teacher.path)
  assert on["student_flops"] - off["student_flops"] == generation(on_policy, student)
  assert off["teacher_flops"] - on["teacher_flops"] == generation(off_policy, teacher)


def test_configs_are_their_cells():
  cells = {name: (c.objective.prefix, c.objective.kl, c.objective.estimator)
           for name in CELLS for c in [_config(name, None)]}
  assert cells == {"sft": ("teacher", "forward", "exact"), "dagger": ("student", "forward", "exact"),
                   "offline_rl": ("teacher", "reverse", "sampled"), "opd": ("student", "reverse", "sampled"),
                   "kl_mix": ("student", "mixed", "exact")}
  assert _config("kl_mix", None).objective.lam == 0.25


def test_student_remat_runs(student, tmp_path):
  config = _config("kl_mix")
  config.student.path, config.student.remat = student, "block"  # as configs/qwen3_8b_to_0p6b.py
  runner.run_distill(config, tmp_path)


@pytest.mark.parametrize("workdir", ["gs://bucket/run", "s3://bucket/run"])
def test_url_workdir_is_refused_before_compute(workdir):
  """metrics.jsonl is appended line by line, which object stores cannot do: mount the bucket instead."""
  with pytest.raises(ValueError, match=r"--workdir=.*://bucket/run.*mount"):
    runner.run_distill(_config("opd"), workdir)


def test_with_overrides_copies_and_refuses_unknown_fields():
  base = config_files.load("quickstart")
  changed = presets.with_overrides(base, (("objective.kl", "mixed"), ("objective.lam", 0.25)))
  assert (changed.objective.kl, changed.objective.lam) == ("mixed", 0.25)
  assert (base.objective.kl, base.objective.lam) == ("reverse", None)  # the original is untouched
  with pytest.raises(KeyError, match=r"no config field 'objective\.lamda'"):
    presets.with_overrides(base, (("objective.lamda", 0.25),))
  with pytest.raises(TypeError):  # the placeholder stays typed
    presets.with_overrides(base, (("objective.lam", "a quarter"),))
