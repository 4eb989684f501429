"""vinf_jax: Video-Infinity (distributed long video generation) with VideoCrafter2 in JAX / Flax NNX.

The public entry points are :mod:`vinf_jax.pipeline` (``GenerationConfig``, ``generate``), the command
``python -m vinf_jax.sample`` and the converter ``python -m convert.videocrafter2``.
"""

__version__ = "0.1.0"
