"""Text -> long video: the library behind ``python -m vinf_jax.sample``, the web page and the Colab notebook.

One call, :func:`generate`, runs the whole job from a frozen :class:`GenerationConfig` as named stages
(:mod:`.run`), each a function the app, the benchmarks and the notebook can also call on its own::

    GenerationConfig
        |
    prepare   validate every setting before anything loads; mesh; a resumed state    settings.py, state.py
        |
    load      converted weights or random ones; the Models kept between videos       models.py
        |
    encode    the prompts once; each frame's text laid out over the devices          prompts.py
        |
    compile   the clip-parallel step (one XLA program, both CFG branches), kept       programs.py
        |     on the Models' Programs for the next video of the same shape
    sample    x_T per global frame where it lies; one step per sampling step, with    run.py, progress.py
        |     a progress line and (optionally) resumable state                          state.py
    decode    the VAE on each device's frames in chunks, gathered to process 0        programs.py
        |
    write     video, JSON sidecar, latents renamed into place together; on a failed   outputs.py
              write the sampled state is rescued

    SIGTERM / SIGINT inside ``interrupts.handled()`` (the command line): any          interrupts.py
              stage stops, with the sampled state saved where ``resume`` finds it

The split is by job: a change to how states are saved touches ``state.py`` only, a new stage is a new
function in ``run.py`` and its module. Everything a user of the library needs is importable from here.
"""

from vinf_jax import video_io  # noqa: F401 -- the app reaches the outputs' helpers through here
from vinf_jax.pipeline.interrupts import Interrupted
from vinf_jax.pipeline.models import Models, host_device, load_models, random_model
from vinf_jax.pipeline.programs import Programs, make_decoder, use_compilation_cache, will_compile
from vinf_jax.pipeline.progress import StepInfo
from vinf_jax.pipeline.prompts import encode_prompts, frame_contexts, prompt_weights
from vinf_jax.pipeline.run import Cancelled, GenerationResult, OutOfMemory, Run, generate
from vinf_jax.pipeline.settings import DTYPES, SEED_RANGE, GenerationConfig, Resolved, validate
from vinf_jax.pipeline.state import STATE_CHECKSUMS, STATE_META, STATE_PREFIX

__all__ = [
  "DTYPES",
  "SEED_RANGE",
  "STATE_CHECKSUMS",
  "STATE_META",
  "STATE_PREFIX",
  "Cancelled",
  "GenerationConfig",
  "GenerationResult",
  "Interrupted",
  "Models",
  "OutOfMemory",
  "Programs",
  "Resolved",
  "Run",
  "StepInfo",
  "encode_prompts",
  "frame_contexts",
  "generate",
  "host_device",
  "load_models",
  "make_decoder",
  "prompt_weights",
  "random_model",
  "use_compilation_cache",
  "validate",
  "will_compile",
]
