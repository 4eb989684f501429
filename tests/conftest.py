"""Test session setup (before jax initialises): 8 fake CPU devices for the clip-parallel tests, and one
persistent compilation cache for the whole run.

Many tests compile the same programs: the tiny model's step and decoder under the demo settings, in this
process and in the command-line, multi-process and notebook subprocesses they start (which inherit the
environment), and the model builds' many small eager programs. JAX's persistent cache lets each program
compile once per run; a cache hit runs the same compiled program, so no result changes. The folder is new
for every run (nothing carries over between runs) and removed at the end. Tests of the cache itself use
their own folders (``pipeline.use_compilation_cache`` reopens the cache there).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="vinf_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  # every program, the model builds' small eager ones too (a subprocess compiles them again otherwise)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
