"""Suite-wide settings, applied before any test module imports JAX."""
import os

# strategy='auto' measures every applicable strategy the first time it meets a problem
# (dynconv_jax.autotune): in the suite that would compile each candidate for every test shape.
# The suite runs the fixed rules instead (also in the subprocesses it starts); tests/test_autotune.py
# turns measuring on with a cache of its own.
os.environ.setdefault("DYNCONV_AUTOTUNE", "0")
