"""Cross-tokenizer distillation: the shipped char-level teacher into a student that reads the task in BPE
tokens (assets/arithmetic_bpe, 96 tokens whose merges cross "+", "=", "#": "+5=1", "3,13", ...).

Each step the student samples a completion in its own tokens; the text is re-tokenized with the teacher's
tokenizer (the char tokenizer files shipped with the teacher) and the two token sequences are matched by
character spans. objective.cross_tokenizer = "span" with the sampled estimator (the default here): on-policy
reverse KL per span group, REINFORCE on the student's log-prob of the span with the reward
log P_teacher(span) - log Q_student(span). With estimator="exact": where a span is one shared token on both
sides (a single character) the exact token-level KL, elsewhere the KL between the two models' probabilities
of the span's text. "uld": the sorted-probability distance at each span's first token (no vocabulary map).
README ("Cross-tokenizer distillation") has the measured variants.

Launch (built-in arithmetic task; a few minutes on 2 CPU cores):
  python run.py --config configs/cross_tokenizer.py --workdir /tmp/xtok
  python run.py --config configs/cross_tokenizer.py --config.objective.estimator=exact \
      --config.objective.prefix=dataset --config.objective.kl=forward --workdir /tmp/xtok_data
  python run.py --config configs/cross_tokenizer.py:smoke --workdir /tmp/xtok_smoke   # seconds: tests
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  c = presets.arithmetic(base_config())  # shipped teacher, weak student (fitted on the BPE's ids first)
  c.data.tokenizer = str(presets.ASSETS / "arithmetic_bpe")  # the student's ids; the teacher reads text
  c.objective.cross_tokenizer = "span"
  c.objective.prefix = "student"
  c.objective.kl = "reverse"
  c.objective.estimator = "sampled"
  c.optimizer.learning_rate = 1e-3  # as configs/opd.py: one sampled span per group is a noisy gradient
  return presets.apply_arg(c, arg, {"smoke": presets.smoke})
