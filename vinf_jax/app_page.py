"""The Gradio page of ``python -m vinf_jax.app``: its layout and the two events wired to a :class:`Handler`.

Split from :mod:`vinf_jax.app` by job: that module holds everything a request needs without Gradio (the
settings of the page's values, the multi-process channel, the :class:`~vinf_jax.app.Handler` that runs
one video at a time, the command's flags and start-up), which tests and benchmarks drive directly; this
one only lays out the components and turns their events into ``Handler.run`` / ``Handler.cancel`` calls.
Gradio is imported when a page is built, never at import.
"""

# No `from __future__ import annotations`: Gradio reads the handlers' `request: gr.Request` hints at run time.
import os

from vinf_jax.app import FIELDS, Handler, page_values


def _header(handler: Handler) -> str:
  import jax

  cfg, m = handler.base, handler.models.config
  where = (
    f"weights `{cfg.weights}` ({m.kind})"
    if cfg.weights
    else f"random weights of the '{m.name}' model, {m.kind} (seed {cfg.weights_seed}): the videos are noise-like"
  )
  return (
    "## vinf_jax: text to long video\n"
    f"{where}; {jax.device_count()} {jax.devices()[0].device_kind} device(s) in {jax.process_count()} "
    f"process(es), {cfg.resolved_dtype()}. "
    "One prompt per line makes a multi-prompt video. The first request of a shape compiles its programs; "
    "later ones of the same shape and sampler settings reuse them."
  )


def _status_md(status: str) -> str:
  head, _, rest = status.partition("\n")
  if status.startswith("error:") or rest:
    return "```text\n" + status + "\n```"
  return head


def _device_choices() -> list[tuple[str, int]]:
  """The devices dropdown's ``(label, num_devices)`` pairs: all of them (0), or the first k local ones."""
  import jax

  if jax.process_count() > 1:
    return [(f"all ({jax.device_count()}, every process)", 0)]
  return [(f"all ({jax.device_count()})", 0)] + [(str(k), k) for k in range(1, jax.local_device_count() + 1)]


def _settings_column(handler: Handler) -> tuple[list, object, object]:
  """The left column's components (inside its ``gr.Column``): ``(inputs in FIELDS order, generate, cancel)``."""
  import gradio as gr

  v = page_values(handler.base)
  samplers = handler.samplers
  devices = _device_choices()
  prompts = gr.Textbox(
    v["prompts"], label="prompts (one per line)", lines=3, elem_id="prompts", placeholder="a red panda ..."
  )
  negative = gr.Textbox(v["negative_prompt"], label="negative prompt", elem_id="negative_prompt")
  with gr.Row():
    frames = gr.Number(v["frames"], label="frames", precision=0, elem_id="frames")
    height = gr.Number(v["height"], label="height", precision=0, step=64, elem_id="height")
    width = gr.Number(v["width"], label="width", precision=0, step=64, elem_id="width")
  with gr.Row():
    sampler = gr.Dropdown(samplers, value=v["sampler"] if v["sampler"] in samplers else samplers[0], label="sampler")
    steps = gr.Number(v["steps"], label="steps", precision=0, elem_id="steps")
    guidance = gr.Number(v["guidance"], label="guidance", elem_id="guidance")
  with gr.Row():
    seed = gr.Number(v["seed"], label="seed", precision=0, elem_id="seed")
    num_devices = gr.Dropdown(
      devices,
      value=v["num_devices"] if v["num_devices"] in dict(devices).values() else 0,
      label="devices (num_devices)",
    )
  with gr.Row():
    attention = gr.Dropdown(["dual", "full"], value=v["attention"], label="attention")
    window = gr.Number(v["window"], label="window", precision=0, elem_id="window")
    num_global = gr.Number(v["num_global"], label="global frames (num_global)", precision=0, elem_id="num_global")
  with gr.Row():
    go = gr.Button("Generate", variant="primary", elem_id="generate")
    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
  inputs = [prompts, negative, frames, height, width, sampler, steps, guidance, seed, attention, window]
  inputs += [num_global, num_devices]
  return inputs, go, stop


def _results_column() -> list:
  """The right column's components (inside its ``gr.Column``): ``[status, video, files, settings, log]``."""
  import gradio as gr

  status = gr.Markdown("", elem_id="status")
  video = gr.Video(label="video", elem_id="video", interactive=False, autoplay=True, loop=True)
  files = gr.File(label="download: the mp4 and its JSON sidecar", file_count="multiple", elem_id="files")
  with gr.Accordion("settings of the last run", open=False):
    settings = gr.JSON(elem_id="settings")
  with gr.Accordion("log", open=False):
    log = gr.Textbox(label="progress lines", lines=8, max_lines=30, elem_id="log")
  return [status, video, files, settings, log]


def _events(handler: Handler):
  """``(generate, cancel)``: the Gradio functions of the two buttons, over ``handler``."""
  import gradio as gr

  # Named parameters, not *args: Gradio passes the request and the progress tracker only to those.
  def generate(
    prompts,
    negative_prompt,
    frames,
    height,
    width,
    sampler,
    steps,
    guidance,
    seed,
    attention,
    window,
    num_global,
    num_devices,
    request: gr.Request,
    progress=gr.Progress(),
  ):
    values = dict(locals())
    values = {name: values[name] for name in FIELDS}

    def report(done, total, desc):
      try:
        progress((done, total) if done is not None else None, desc=desc, unit="steps")
      except Exception:  # a cancelled event's tracker: the run goes on to its next step and stops there
        pass

    reply = handler.run(values, session=request.session_hash or "", progress=report)
    if not reply.ok:  # the last video and its settings stay on the page
      return _status_md(reply.status), gr.skip(), gr.skip(), gr.skip(), reply.log
    return _status_md(reply.status), reply.video, [reply.video, reply.sidecar], reply.settings, reply.log

  def cancel(request: gr.Request):
    return _status_md(handler.cancel(request.session_hash or "", wait_s=600))

  return generate, cancel


def build_page(handler: Handler):
  """The Gradio page over ``handler`` (queue and concurrency set; call ``.launch()``)."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  import gradio as gr

  # Gradio keeps a copy of each video it serves: drop copies older than a day (the videos stay in outputs_dir).
  with gr.Blocks(title="vinf_jax", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as page:
    gr.Markdown(_header(handler), elem_id="header")
    with gr.Row():
      with gr.Column(scale=1):
        inputs, go, stop = _settings_column(handler)
      with gr.Column(scale=1):
        outputs = _results_column()
    generate, cancel = _events(handler)
    # preprocess=False: the values reach generate() as sent (Gradio's own checks of a number or a choice raise
    # with a traceback in the terminal and {"error": null} for the caller); page_config names every bad one.
    event = go.click(
      generate,
      inputs,
      outputs,
      api_name="generate",
      concurrency_limit=1,
      concurrency_id="video",
      preprocess=False,
    )
    stop.click(cancel, None, [outputs[0]], api_name="cancel", queue=False, cancels=[event])
  page.queue(default_concurrency_limit=1)
  _pad_missing_values(page, "generate")
  return page


def _pad_missing_values(page, api_name: str) -> None:
  """A request of ``api_name`` with fewer values than the event's inputs (the raw HTTP API) gets None for the
  missing ones, which the settings name as empty; Gradio would refuse it with a traceback in the terminal.

  Gradio checks the count in ``Blocks.validate_inputs`` before any of the event's code runs, and then reads
  the same list: this wraps that method of this page.
  """
  check = page.validate_inputs

  def validate_inputs(block_fn, inputs):
    if getattr(block_fn, "api_name", None) == api_name and isinstance(inputs, list):
      inputs.extend([None] * (len(block_fn.inputs) - len(inputs)))
    return check(block_fn, inputs)

  page.validate_inputs = validate_inputs
