"""Test setup: 8 virtual CPU devices (sharded == single-device tests) before any backend starts,
and a persistent compilation cache shared by the pytest workers and the runs they start.

Many tests run `jaxgen.main` several times on one config (train, resume, sample, eval), and each
run jit-compiles the same programs again; the cache compiles each once per suite. It lives in
JAX_COMPILATION_CACHE_DIR (default: a fresh directory per pytest session, so every suite run
measures a cold start as CI sees it).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set in the environment, not only jax.config, so subprocesses (preemption tests) share it. The
# xdist workers inherit the controller's value: one directory per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgen_test_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)
