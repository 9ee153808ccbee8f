"""XLA flags for the whole session (before jax is imported anywhere; subprocesses and notebook kernels
inherit them), and session fixtures.

- 8 simulated CPU devices, for the sharding tests.
- LLVM at -O0 for XLA's CPU code: the suite compiles hundreds of tiny programs and runs each a few times,
  so compiling without LLVM's optimisation passes saves more than the slower code costs
  (tests/test_train_step.py: 162 -> 85 s of CPU). Values stay IEEE float32 (no fast-math at any level);
  rounding may differ in the last bits from an optimised build (one tolerance in test_chunked_fused.py
  says so).
"""

import os

for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import json  # noqa: E402  (after the XLA flag above)
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
_SMOKE_STUDY_DIR = "KLD_STUDY_SMOKE_DIR"  # config_files.SMOKE_STUDY_DIR


def pytest_configure(config):
  """One directory for the session's smoke study (config_files.smoke_study), made by the main process
  before xdist starts its workers, which inherit the variable, as do the notebooks' kernels."""
  if not hasattr(config, "workerinput") and _SMOKE_STUDY_DIR not in os.environ:
    config.smoke_study_dir = tempfile.mkdtemp(prefix="kld_study_smoke_")
    os.environ[_SMOKE_STUDY_DIR] = config.smoke_study_dir


def pytest_unconfigure(config):
  directory = getattr(config, "smoke_study_dir", None)
  if directory:
    for _ in range(3):  # a background writer (orbax) may still add files while the tree goes
      shutil.rmtree(directory, ignore_errors=True)
      if not os.path.exists(directory):
        break
    os.environ.pop(_SMOKE_STUDY_DIR, None)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A tiny real tfds dataset in array_record files, built from in-memory examples (no TensorFlow): GSM8K
  sample rows 0-3 as "train", the rest as "test". One per session: tfds registers builder classes
  globally, so the builder cannot be defined twice."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rows = [json.loads(line) for line in (DATA / "gsm8k_sample.jsonl").read_text().splitlines()]

  class KldistillTinyGsm8k(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(rows[:4]), "test": self._generate_examples(rows[4:])}

    def _generate_examples(self, split_rows):
      for i, row in enumerate(split_rows):
        yield i, row

  data_dir = tmp_path_factory.mktemp("tfds")
  KldistillTinyGsm8k(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir
