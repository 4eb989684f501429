r"""A web page to make videos: ``python -m vinf_jax.app [--flagfile FILE] [--port 7860] [--share]``.

The flags are those of ``vinf_jax.sample`` (a flagfile gives the page's initial values and the model or
weights), plus ``--port``, ``--host``, ``--share`` and ``--outputs_dir``. The models load once, when the
server starts; each request of the page calls :func:`vinf_jax.pipeline.generate` with them, so the
compiled step and decoder of the last settings are reused by the next request of the same shape.

One video is made at a time: Gradio's queue (concurrency 1) holds the others and shows their place.
Cancel stops the running request before its next step, with nothing written. Bad settings get the
messages the command line prints, in the page. Videos and their JSON sidecars go to ``--outputs_dir``.

Several hosts: start the same command on every host with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or ``--distributed``). Only process 0 serves the page; it sends each
request's settings to the other processes (:class:`Channel`), and every process then runs it.

This module is the server without Gradio: the page's values as settings, the processes' channel, the
:class:`Handler` that runs the requests (tests and ``benchmarks/app_requests.py`` call it directly) and the
command. The page's layout and events are :mod:`vinf_jax.app_page` (:func:`build_page` here hands over to it).
"""

# No `from __future__ import annotations`: Gradio reads the handlers' `request: gr.Request` hints at run time.
import dataclasses
import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from vinf_jax import pipeline, sample, sampling
from vinf_jax.config import ModelConfig

F = sample.F


def define_flags() -> None:
  """Add the page's flags to ``vinf_jax.sample``'s flag set (once).

  Called by the entry points, not at import: a process that imports this module (tests) keeps the command
  line's flag set as ``python -m vinf_jax.sample`` has it.
  """
  if "port" in F:
    return
  sample.flags.DEFINE_integer("port", 7860, "Port of the page.", flag_values=F)
  sample.flags.DEFINE_string(
    "host", "127.0.0.1", "Address the page listens on (0.0.0.0: every interface of this machine).", flag_values=F
  )
  sample.flags.DEFINE_bool("share", False, "Also serve the page through a public Gradio share link.", flag_values=F)
  sample.flags.DEFINE_string(
    "outputs_dir", "outputs/app", "Where the page's videos and their JSON sidecars are written.", flag_values=F
  )


# The page's inputs, by their GenerationConfig (and flag) names; every other setting comes from the flags.
FIELDS = (
  "prompts",
  "negative_prompt",
  "frames",
  "height",
  "width",
  "sampler",
  "steps",
  "guidance",
  "seed",
  "attention",
  "window",
  "num_global",
  "num_devices",
)
_INTS = ("frames", "height", "width", "steps", "seed", "window", "num_global", "num_devices")
_FLOATS = ("guidance",)
# Settings of one command-line run that a page's requests do not take from the flags (each request writes a
# new video into --outputs_dir and nothing else).
_PER_RUN = {
  "save_latents": "",
  "save_state_every": 0,
  "state_dir": "",
  "resume": "",
  "stop_after": 0,
  "compile_only": False,
}


# ------------------------------------------------------------------------------------------------
# Samplers the loaded model can run


def sampler_supported(name: str, model: ModelConfig) -> bool:
  """Whether ``model`` can run the sampler ``name`` (the page offers only those)."""
  # T2V-Turbo weights (a guidance embedding, time_cond_proj) run the turbo sampler only, the others the guided ones
  return (name == "turbo") == bool(model.unet.time_cond_proj_dim)


def sampler_choices(model: ModelConfig) -> list[str]:
  """The samplers of :data:`vinf_jax.sampling.SAMPLERS` that ``model`` supports, in their order."""
  return [s for s in sampling.SAMPLERS if sampler_supported(s, model)]


# ------------------------------------------------------------------------------------------------
# Page values -> settings


def _page_text(name: str, v) -> tuple[object, str | None]:
  """A text box's value (None: empty) or the error of a value of another kind (the page's API takes anything)."""
  if v is None:
    return "", None
  if not isinstance(v, str):
    return None, f"{name}={v!r} ({type(v).__name__}), expected text"
  return v, None


def _page_number(name: str, v) -> tuple[object, str | None]:
  """A number box's value as the settings take it, or the error: empty (None, blank), not a number."""
  if v is None or (isinstance(v, str) and not v.strip()):
    return None, f"{name}: empty, expected a number"
  if isinstance(v, str):
    try:
      v = float(v)
    except ValueError:
      return None, f"{name}={v!r}, expected a number"
  if isinstance(v, bool) or not isinstance(v, int | float):
    return None, f"{name}={v!r} ({type(v).__name__}), expected a number"
  if name in _INTS and isinstance(v, float) and v.is_integer():
    return int(v), None
  if name in _FLOATS and isinstance(v, int):
    return float(v), None
  return v, None  # a non-integral frames=16.5: validate's message


def page_config(base: pipeline.GenerationConfig, values: dict, output: str) -> pipeline.GenerationConfig:
  """The settings of one request: ``base`` (the flags) with the page's ``values`` and ``output``.

  ``values`` holds :data:`FIELDS` (missing ones keep the flags' value); ``prompts`` is text with one prompt
  per line (blank lines skipped). Numbers arrive as the page sends them (float or int; None when a box was
  emptied; anything at all through the page's API): an integral float becomes an int, a non-integral one is
  left to :func:`vinf_jax.pipeline.validate`, so the messages are the command line's. Raises ValueError (in
  validate's format) for empty boxes and values of the wrong kind, listing with them what validate says of
  the other settings (every bad setting named at once).
  """
  unknown = sorted(set(values) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown page fields {unknown}; expected some of {', '.join(FIELDS)}")
  kw, e, bad = dict(values), [], []
  for name in FIELDS:
    if name not in kw or name in ("sampler", "attention"):  # any value: validate names a wrong one
      continue
    check = _page_text if name in ("prompts", "negative_prompt") else _page_number
    kw[name], err = check(name, kw[name])
    if err:
      e.append(err)
      bad.append(name)
      del kw[name]  # the flags' value stands in while validate checks the rest
  if "prompts" in kw:
    kw["prompts"] = tuple(ln.strip() for ln in kw["prompts"].splitlines() if ln.strip())
  cfg = dataclasses.replace(base, **kw, **_PER_RUN, output=output)
  if e:
    raise ValueError("invalid settings:\n  - " + "\n  - ".join(e + _other_errors(cfg, bad)))
  return cfg


def _other_errors(cfg: pipeline.GenerationConfig, bad: list[str]) -> list[str]:
  """validate's errors for ``cfg`` (whose ``bad`` settings are the flags' stand-ins), less those about them."""
  if "prompts" in bad and not cfg.prompts:
    cfg = dataclasses.replace(cfg, prompts=("a prompt",))
  try:
    pipeline.validate(cfg)
  except (ValueError, TypeError) as err:
    items = [ln.strip()[2:] for ln in str(err).splitlines()[1:]] if isinstance(err, ValueError) else []
  else:
    return []
  about = re.compile(r"\b(" + "|".join(bad) + r")=")
  out, dropped = [], False
  for item in items:  # a frames hint follows the frames error it explains: it goes with it
    dropped = bool(about.search(item)) or (dropped and item.startswith("frames that work"))
    if not dropped:
      out.append(item)
  return out


def page_values(cfg: pipeline.GenerationConfig) -> dict:
  """:data:`FIELDS` of ``cfg`` as the page shows them (the prompts as lines)."""
  values = {name: getattr(cfg, name) for name in FIELDS}
  values["prompts"] = "\n".join(cfg.prompts)
  values["guidance"] = cfg.resolved_guidance()  # None in the flags: the sampler's default
  return values


# ------------------------------------------------------------------------------------------------
# Several processes: process 0 -> the others


def encode_request(op: str, cfg: pipeline.GenerationConfig | None = None) -> bytes:
  """One message of the follower protocol: ``op`` 'generate' (with ``cfg``) or 'stop', as UTF-8 JSON."""
  if op not in ("generate", "stop") or (op == "generate") != (cfg is not None):
    raise ValueError(f"op={op!r}: expected 'generate' with settings or 'stop' without")
  msg = {"op": op}
  if cfg is not None:
    msg["config"] = dataclasses.asdict(cfg)
  return json.dumps(msg, ensure_ascii=False, allow_nan=True).encode("utf-8")


def decode_request(data: bytes) -> tuple[str, pipeline.GenerationConfig | None]:
  """The inverse of :func:`encode_request`: ``(op, settings or None)``."""
  msg = json.loads(data.decode("utf-8"))
  if msg.get("op") == "stop":
    return "stop", None
  if msg.get("op") != "generate":
    raise ValueError(f"unknown request {msg.get('op')!r}")
  d = dict(msg["config"])
  d["prompts"] = tuple(d["prompts"])
  return "generate", pipeline.GenerationConfig(**d)


class Channel:
  """Process 0 tells the other processes what to run; a no-op with one process.

  Built on ``jax.experimental.multihost_utils.broadcast_one_to_all`` (a collective over every device of every
  process), so every process must make the same calls in the same order: process 0 sends (:meth:`send`) each
  request and the others :meth:`recv` it, then all run it, asking :meth:`agreed` stop functions the same
  number of times.
  """

  def __init__(self):
    import jax

    self.multi = jax.process_count() > 1
    self.leader = jax.process_index() == 0

  @staticmethod
  def _broadcast(data: bytes | None) -> bytes:
    import jax
    from jax.experimental import multihost_utils

    source = jax.process_index() == 0
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if source else 0)))
    size = max(1024, 1 << (n - 1).bit_length())  # a few padded sizes: a few small programs, not one per length
    buf = np.zeros(size, np.uint8)
    if source:
      buf[:n] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8)[:n].tobytes()

  def send(self, data: bytes) -> None:
    if self.multi:
      self._broadcast(data)

  def recv(self) -> bytes:
    return self._broadcast(None)

  def agreed(self, local: Callable[[], bool]) -> Callable[[], bool]:
    """A stop function for ``generate`` that returns process 0's ``local()`` on every process."""
    if not self.multi:
      return local
    from jax.experimental import multihost_utils

    def stop() -> bool:
      flag = np.int32(bool(local()) if self.leader else 0)
      return bool(multihost_utils.broadcast_one_to_all(flag))

    return stop


def follow(models: pipeline.Models, channel: Channel, log: Callable[[str], None] = print) -> int:
  """A process other than 0: run process 0's requests until it says stop; returns the requests run."""
  done = 0
  never = lambda: False
  while True:
    op, cfg = decode_request(channel.recv())
    if op == "stop":
      return done
    try:
      pipeline.generate(cfg, models=models, log=lambda m: None, should_stop=channel.agreed(never))
    except (pipeline.Cancelled, ValueError, FloatingPointError) as err:
      log(f"request {done + 1}: {err}")
    except Exception as err:  # as on process 0: the next request may well work
      traceback.print_exc()
      log(f"request {done + 1}: the run failed: {type(err).__name__}: {err}")
    done += 1


# ------------------------------------------------------------------------------------------------
# The request handler


@dataclasses.dataclass
class Reply:
  """What one request gives the page.

  Attributes:
    ok: a video was made.
    status: what happened, in words: the CLI's error text for bad settings (``error: invalid settings: ...``).
    video: the written mp4, or None.
    sidecar: its JSON sidecar, or None.
    settings: the sidecar's content (the settings of the run), or None.
    log: the run's progress lines.
  """

  ok: bool
  status: str
  video: str | None = None
  sidecar: str | None = None
  settings: dict | None = None
  log: str = ""


Progress = Callable[[int | None, int | None, str], None]  # (done, total or None, what is happening)


def _clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Handler:
  """The page's requests, one at a time, on models loaded once (no Gradio here: tests call it directly).

  Args:
    base: the settings from the flags; each request replaces :data:`FIELDS` and the output.
    models: from :func:`vinf_jax.pipeline.load_models` for ``base``.
    outputs_dir: where videos are written (``NNNN_seedS.mp4`` and ``.json``).
    channel: with several processes, the :class:`Channel` of process 0.
    echo: also print the progress lines (the server's terminal).
  """

  def __init__(
    self,
    base: pipeline.GenerationConfig,
    models: pipeline.Models,
    outputs_dir: str,
    *,
    channel: Channel | None = None,
    echo: bool = True,
  ):
    self.base = dataclasses.replace(base, **_PER_RUN)
    self.models = models
    self.outputs_dir = os.path.abspath(outputs_dir)
    self.channel = channel or Channel()
    self.echo = echo
    self._run_lock = threading.Lock()  # one video at a time, whatever calls run()
    self._lock = threading.Lock()  # guards the per-session books below
    self._entered: dict[str, int] = {}  # session -> requests inside run()
    self._stop: set[str] = set()  # sessions whose requests stop at their next step
    self._idle: dict[str, threading.Event] = {}
    self._last: dict[str, Reply] = {}
    self._count = 0

  @property
  def samplers(self) -> list[str]:
    return sampler_choices(self.models.config)

  def _next_output(self, seed) -> str:
    with self._lock:
      self._count += 1
      n = self._count
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}_{n:04d}_seed{seed}.mp4" if isinstance(seed, int) else f"{stamp}_{n:04d}.mp4"
    return os.path.join(self.outputs_dir, name)

  def run(self, values: dict, *, session: str = "", progress: Progress | None = None) -> Reply:
    """Make the video of the page's ``values`` (see :func:`page_config`); never raises for bad input."""
    try:
      cfg = page_config(self.base, values, "")
      cfg = dataclasses.replace(cfg, output=self._next_output(cfg.seed))
      pipeline.validate(cfg)
    except (ValueError, TypeError) as err:  # TypeError: values of the wrong kind through the HTTP API
      return Reply(False, f"error: {err}")
    with self._lock:
      self._entered[session] = self._entered.get(session, 0) + 1
      self._idle.setdefault(session, threading.Event()).clear()
    reply = None
    try:
      if progress is not None and self._run_lock.locked():
        progress(None, None, "waiting for the running video to stop")
      with self._run_lock:
        reply = self._run(cfg, session, progress)
    finally:
      with self._lock:
        if reply is not None:
          self._last[session] = reply
        self._entered[session] -= 1
        if not self._entered[session]:
          self._stop.discard(session)
          self._idle[session].set()
    return reply

  def _run(self, cfg: pipeline.GenerationConfig, session: str, progress: Progress | None) -> Reply:
    import jax

    if session in self._stop:
      return Reply(False, "cancelled before it started; nothing was written")
    lines: list[str] = []

    def log(msg: str) -> None:
      lines.append(msg)
      if self.echo:
        print(msg, flush=True)

    d = cfg.num_devices or jax.device_count()
    what = f"{cfg.frames} frames at {cfg.height}x{cfg.width} over {d} device(s)"
    compiles = pipeline.will_compile(cfg, self.models)
    if progress is not None:
      n = sampling.num_steps(sampling.make_plan(cfg.sampler_config()))  # DDIM's spacing may run more than steps
      if "step" in compiles:
        progress(0, n, f"compiling a new step program for this shape ({what}); later requests reuse it")
      else:
        progress(0, n, f"encoding the prompts ({what}; the compiled step is reused)")

    def on_step(info: pipeline.StepInfo) -> None:
      if progress is None:
        return
      if info.step < info.num_steps:
        desc = (
          f"step {info.step}/{info.num_steps}  t={info.timestep}  {info.seconds_per_step:.2f} s/step  "
          f"ETA {_clock(info.eta_s)}"
        )
      else:
        desc = f"step {info.step}/{info.num_steps} done; decoding and writing the video"
      progress(info.step, info.num_steps, desc)

    self.channel.send(encode_request("generate", cfg))
    stop = self.channel.agreed(lambda: session in self._stop)
    try:
      res = pipeline.generate(cfg, models=self.models, log=log, on_step=on_step, should_stop=stop)
    except pipeline.Cancelled as err:
      return Reply(False, str(err), log="\n".join(lines))
    except (ValueError, FloatingPointError) as err:
      return Reply(False, f"error: {err}", log="\n".join(lines))
    except Exception as err:  # the page stays up; the traceback goes to the server's terminal
      traceback.print_exc()
      return Reply(False, f"error: the run failed: {type(err).__name__}: {err}", log="\n".join(lines))
    t = res.sidecar["timings_s"]
    if compiles:
      done = " and ".join(compiles)
      note = f"compiled a new {done} program for this shape ({t.get('compile', 0) + t.get('decode_compile', 0):.1f} s)"
    else:
      note = "reused the compiled programs"
    status = (
      f"done: {what} in {t['total']:.1f} s (denoise {t['denoise']:.1f} s, "
      f"{t['denoise'] / max(1, res.steps_done):.2f} s/step); {note}"
    )
    if res.sidecar.get("prompts_truncated"):  # the log's warning, on the page too
      status += "\n" + pipeline.prompts.truncation_warning(res.sidecar["prompts_truncated"], len(cfg.prompts))
    return Reply(True, status, res.output, pipeline.video_io.sidecar_path(res.output), res.sidecar, "\n".join(lines))

  def cancel(self, session: str = "", wait_s: float = 0.0) -> str:
    """Stop this session's request before its next step; wait up to ``wait_s`` for it to end, and say how."""
    with self._lock:
      if not self._entered.get(session):
        return "nothing of this page is running (a waiting request is taken off the queue)"
      self._stop.add(session)
      idle = self._idle[session]
    if wait_s and idle.wait(wait_s):
      with self._lock:
        if session in self._last:
          return self._last[session].status
    return "cancelling: the request stops before its next step"

  def finish(self) -> None:
    """Tell the other processes to stop following (process 0, when the server closes)."""
    self.channel.send(encode_request("stop"))


# ------------------------------------------------------------------------------------------------
# The page (its layout: vinf_jax.app_page)


def build_page(handler: Handler):
  """The Gradio page over ``handler`` (queue and concurrency set; call ``.launch()``): see
  :func:`vinf_jax.app_page.build_page`, imported here on first use (it imports this module)."""
  from vinf_jax import app_page

  return app_page.build_page(handler)


# ------------------------------------------------------------------------------------------------
# The command


def prepare(*, page: bool = True) -> Handler | None:
  """From the parsed flags: check them (exit 2 with the message), start jax.distributed, load the models.

  Process 0 gets the page's :class:`Handler`; the other processes follow process 0's requests here until it
  closes, and get None. ``page=False``: the handler alone, without Gradio (benchmarks). The flags must have
  been parsed after :func:`define_flags`.
  """
  import importlib.util

  if page and importlib.util.find_spec("gradio") is None:  # checked by every process: they all stop, none waits
    print('error: the page needs gradio: pip install -e ".[app]"', file=sys.stderr)
    sys.exit(2)
  if not 1 <= F.port <= 65535:
    print(f"error: port={F.port}, expected 1..65535", file=sys.stderr)
    sys.exit(2)
  if F.coordinator_address and not 0 <= F.process_id < F.num_processes:
    print(f"error: process_id={F.process_id}, expected 0..{F.num_processes - 1} (num_processes)", file=sys.stderr)
    sys.exit(2)
  sample._init_distributed()  # before anything touches a device (validation counts them)
  import jax

  outputs_dir = os.path.expanduser(F.outputs_dir)
  try:
    base = sample.config_from_flags()
    if not os.path.isdir(outputs_dir):
      pipeline.video_io.check_writable(outputs_dir, "outputs_dir", directory=True)
    # The flags' prompts are only the page's first value: check the rest with a stand-in prompt.
    first = page_config(base, {"prompts": "\n".join(base.prompts) or "a prompt"}, os.path.join(outputs_dir, "x.mp4"))
    pipeline.validate(first)
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  ignored = [k for k, v in _PER_RUN.items() if getattr(base, k) != v]
  if ignored and jax.process_index() == 0:
    print(f"note: the page ignores {', '.join('--' + k for k in ignored)} (they belong to one command-line run)")
  models = pipeline.load_models(first)
  channel = Channel()
  if jax.process_index() != 0:
    n = follow(models, channel)
    print(f"process {jax.process_index()}: followed {n} request(s); process 0 closed the page")
    return None
  return Handler(base, models, outputs_dir, channel=channel)


def launch_kwargs(handler: Handler) -> dict:
  """``page.launch`` arguments from the flags."""
  return dict(
    server_name=F.host, server_port=F.port, share=F.share, allowed_paths=[handler.outputs_dir], ssr_mode=False
  )


def main(argv: list[str]) -> None:
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
    sys.exit(2)
  handler = prepare()
  if handler is None:
    return
  try:
    build_page(handler).launch(**launch_kwargs(handler))  # until Ctrl-C
  except KeyboardInterrupt:  # a second Ctrl-C while Gradio closes
    pass
  finally:
    handler.finish()


def run() -> None:
  define_flags()
  if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in sys.argv[1:]):
    print(__doc__ + "\nflags:\n" + F.get_help(include_special_flags=False))
    sys.exit(0)
  main(sample.parse_flags(sys.argv))


if __name__ == "__main__":
  run()
