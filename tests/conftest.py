import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

# One persistent XLA compilation cache for the whole session, set before jax is imported so
# that the training subprocesses the tests start (resume after SIGKILL, CLI runs, multiple
# processes) inherit it: a program compiled once (the same tiny model's step in the straight,
# the killed and the resumed run) is read back instead of compiled again. A fresh folder per
# session: nothing carries over between sessions, and the session that made it removes it.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpost-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
