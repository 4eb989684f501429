"""The command line with a pause in one phase, for the signal tests: ``python -m tests._signal_worker FLAGS...``.

``VINF_TEST_PAUSE`` names the phase (load, compile, step, decode, write): there the run prints ``PAUSED PHASE``
and waits (up to a minute) for the test's signal, as a long phase would; ``step`` pauses after step 2, ``write``
after the video's partial file is written. With ``VINF_TEST_HOLD=1`` it goes on waiting after the signal (a
compile or step that takes long), for the second signal.
"""

import os
import sys
import time


def pause(phase: str) -> None:
  try:
    from vinf_jax.pipeline.interrupts import pending
  except ImportError:  # a version without signal handling (the tests' "before")
    pending = lambda: 0  # noqa: E731

  print(f"PAUSED {phase}", flush=True)
  t = time.monotonic()
  while time.monotonic() - t < 60 and (os.environ.get("VINF_TEST_HOLD") or not pending()):
    time.sleep(0.02)


def before(fn, phase):
  def paused(*args, **kwargs):
    pause(phase)
    return fn(*args, **kwargs)

  return paused


def main():
  from vinf_jax import parallel, sample, video_io
  from vinf_jax.pipeline import models, programs
  from vinf_jax.pipeline import run as run_lib

  phase = os.environ["VINF_TEST_PAUSE"]
  if phase == "load":
    models.load_models = before(models.load_models, phase)
  elif phase == "compile":
    parallel.make_denoiser = before(parallel.make_denoiser, phase)
  elif phase == "decode":
    programs.decoder = before(programs.decoder, phase)
  elif phase == "step":
    real_line = run_lib.step_line

    def step_line(info, frames):
      if info.step == 2:
        pause(phase)
      return real_line(info, frames)

    run_lib.step_line = step_line
  elif phase == "write":
    real_render = video_io.render_video

    def render(*args):
      real_render(*args)
      pause(phase)

    video_io.render_video = render
  sys.argv[0] = "vinf_jax.sample"
  sample.run()


if __name__ == "__main__":
  main()
