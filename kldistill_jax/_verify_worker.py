"""The math-verify worker of `rewards`: a plain program answering (gold, predicted) requests on its pipes.

    stdin:  one JSON line ["gold", "predicted"] per request
    stdout: "ready" once math-verify is imported, then one JSON line true / false per request

`rewards` starts it as `python -P <this file>` (a fresh interpreter, not a multiprocessing child), so the
caller's `__main__` is never re-imported: a plain script without an `if __name__ == "__main__":` guard can
grade answers. It imports nothing from kldistill_jax (no jax in the worker), and `-P` keeps this file's
directory off sys.path, where its modules could shadow math-verify's dependencies. It exits when stdin
closes (the parent closed it, or died).
"""

import json
import logging
import os
import sys


def main():
  # Our replies get a private copy of stdout; anything math-verify or sympy prints goes to stderr instead
  # of corrupting the protocol.
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="ascii")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  import math_verify  # pylint: disable=g-import-not-at-top  (slow: sympy; after the redirection)
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notice, per call
  replies.write("ready\n")
  replies.flush()
  for line in sys.stdin:
    gold, predicted = json.loads(line)
    try:  # timeouts off: they need signals; the parent bounds the time by killing this process
      parsed_gold = math_verify.parse(f"${gold}$", parsing_timeout=None)
      parsed_predicted = math_verify.parse(f"${predicted}$", parsing_timeout=None)
      verdict = bool(math_verify.verify(parsed_gold, parsed_predicted, timeout_seconds=None))
    except Exception:  # pylint: disable=broad-except  (unparseable answers are wrong, not fatal)
      verdict = False
    replies.write(json.dumps(verdict) + "\n")  # ASCII only: json escapes everything else
    replies.flush()


if __name__ == "__main__":
  main()
