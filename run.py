"""Entry point: python run.py --config configs/<name>.py[:preset] [--workdir DIR] [--config.x=y ...].

`python run.py --help` lists the configs; `--show` prints a config's fields (kldistill_jax/cli.py)."""

from kldistill_jax import cli

if __name__ == "__main__":
  cli.main()
