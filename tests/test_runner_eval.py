"""The runner's evaluation with n samples per problem: Avg@n, Pass@k in results.json and the final table."""

import json

from kldistill_jax.train import runner
from test_bad_input import tiny_config


def test_avg_and_pass_at_k_reach_results_and_table(tmp_path, capsys):
  config = tiny_config(**{"steps": 1, "eval.samples_per_prompt": 4, "eval.pass_k": (1, 2, 4),
                          "eval.temperature": 1.0, "eval.batch_size": 32})
  runner.run_distill(config, tmp_path)
  results = json.loads((tmp_path / "results.json").read_text())
  for row in ("teacher", "student before", "student after"):
    r = results[row]
    assert r["samples_per_prompt"] == 4 and r["num_problems"] == 8
    assert r["pass_at_1"] == r["accuracy"] == r["avg_at_n"]
    assert r["pass_at_1"] <= r["pass_at_2"] <= r["pass_at_4"]
  assert results["teacher"]["pass_at_4"] > 0.8  # difficulty-2 problems, the shipped teacher
  header = next(line for line in capsys.readouterr().out.splitlines()  # the results table's header
                if line.startswith("model") and "accuracy" in line)
  assert "pass@2" in header and "pass@4" in header and "pass@1" not in header
