r"""Requests to the web page without a browser, with timings: the page's handler, or its HTTP API.

  python -m benchmarks.app_requests --model=videocrafter2 --frames=64 --height=320 --width=512 --steps=10 \
    --num_devices=1 --requests=3 --via=http --json=app.json

Takes ``python -m vinf_jax.app``'s flags (a flagfile gives the settings and the model or weights; without
--weights, random weights of --model: the timings do not depend on the values) and loads the models once,
as the page does. Then ``--requests`` requests with the flags' settings, the seed changing: the first
compiles, the next ones reuse the programs; with ``--cancel_last`` the last one is cancelled after its first
step. ``--via=handler`` calls ``vinf_jax.app.Handler`` directly (no Gradio needed); ``--via=http`` starts the
Gradio server in this process on a free local port and sends the requests with ``gradio_client``, as a
remote user's script would. Prints each request's wall time, status line and the sidecar's timings.
"""

import json
import socket
import sys
import time

from absl import flags

from vinf_jax import app

F = app.F


def define_flags() -> None:
  """The page's flags and these (at start, not at import: see ``vinf_jax.app.define_flags``)."""
  app.define_flags()
  flags.DEFINE_integer("requests", 2, "Requests to send (seeds --seed, --seed+1, ...).", flag_values=F)
  flags.DEFINE_enum("via", "handler", ["handler", "http"], "Call the handler, or the page's HTTP API.", flag_values=F)
  flags.DEFINE_bool("cancel_last", False, "Cancel the last request after its first step.", flag_values=F)
  flags.DEFINE_string("json", "", "Also write the results here.", flag_values=F)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def via_handler(handler: app.Handler, values: dict, cancel: bool) -> dict:
  seen = []

  def progress(done, total, desc):
    seen.append((time.perf_counter(), done, desc))
    if cancel and done == 1:
      handler.cancel("bench")

  t = time.perf_counter()
  reply = handler.run(values, session="bench", progress=progress)
  return {
    "wall_s": time.perf_counter() - t,
    "status": reply.status,
    "timings_s": (reply.settings or {}).get("timings_s"),
    "progress": [(round(s - t, 2), done, desc) for s, done, desc in seen],
  }


def via_http(client, values: dict, cancel: bool) -> dict:
  from gradio_client.utils import Status

  args = [values[name] for name in app.FIELDS]
  t = time.perf_counter()
  job = client.submit(*args, api_name="/generate")
  seen, cancelled = [], None
  while not job.done():
    st = job.status()
    desc = " | ".join(f"{p.index}/{p.length} {p.desc}" for p in (st.progress_data or []))
    if not seen or seen[-1][1:] != (st.code.value, desc):
      seen.append((round(time.perf_counter() - t, 2), st.code.value, desc))
    if cancel and cancelled is None and st.code == Status.PROGRESS and "step 1/" in desc:
      cancelled = client.predict(api_name="/cancel")  # waits until the run has stopped
      break
    time.sleep(0.05)
  if cancelled is not None:
    return {"wall_s": time.perf_counter() - t, "status": cancelled, "timings_s": None, "progress": seen}
  status, video, files, settings, log = job.result()
  wall = time.perf_counter() - t
  return {
    "wall_s": wall,
    "status": status,
    "timings_s": (settings or {}).get("timings_s") if isinstance(settings, dict) else None,
    "video": video,
    "video_frames": _frames_in(video),
    "progress": seen,
  }


def _frames_in(video) -> int | None:
  """Frames in the mp4 that the client downloaded from the page (decoded with imageio's ffmpeg)."""
  path = video.get("video") if isinstance(video, dict) else video
  if not path:
    return None
  import imageio.v2 as iio

  with iio.get_reader(path, format="ffmpeg") as reader:
    return sum(1 for _ in reader)


def _page_html(url: str) -> int:
  """GET the page itself, as a browser does first: its size in bytes (raises unless HTTP 200)."""
  import urllib.request

  with urllib.request.urlopen(url, timeout=30) as r:
    if r.status != 200:
      raise RuntimeError(f"GET {url}: HTTP {r.status}")
    return len(r.read())


def main() -> None:
  from vinf_jax import sample

  define_flags()
  sample.parse_flags(sys.argv)
  t = time.perf_counter()
  handler = app.prepare(page=F.via == "http")
  if handler is None:  # a process other than 0 followed the requests
    return
  load_s = time.perf_counter() - t
  print(f"models loaded in {load_s:.1f} s: {handler.models.config.name}, {app.page_values(handler.base)}")
  page, client = None, None
  if F.via == "http":
    from gradio_client import Client

    t = time.perf_counter()
    page = app.build_page(handler)
    port = _free_port()
    page.launch(**{**app.launch_kwargs(handler), "server_port": port, "share": False}, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}/"
    html_bytes = _page_html(url)
    client = Client(url, verbose=False)
    print(f"page up in {time.perf_counter() - t:.1f} s on port {port} (GET / : {html_bytes} bytes of HTML)")
  results = []
  try:
    for i in range(F.requests):
      values = app.page_values(handler.base) | {"seed": handler.base.seed + i}
      values["prompts"] = values["prompts"] or "a drone shot flying over a snowy mountain range at sunrise"
      cancel = F.cancel_last and i == F.requests - 1
      r = via_http(client, values, cancel) if client else via_handler(handler, values, cancel)
      results.append(r)
      print(f"request {i + 1}/{F.requests} ({F.via}): {r['wall_s']:.1f} s: {r['status']}")
      if r.get("video_frames") is not None:
        print(f"  the page's mp4, downloaded and decoded: {r['video_frames']} frames")
      if r["timings_s"]:
        print("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["timings_s"].items()))
      shown = r["progress"] if len(r["progress"]) <= 5 else r["progress"][:3] + ["..."] + r["progress"][-2:]
      for p in shown:
        print(f"  {p}")
  finally:
    if page is not None:
      page.close()
    handler.finish()
  if F.json:
    with open(F.json, "w") as f:
      json.dump({"load_s": load_s, "via": F.via, "requests": results}, f, indent=1, default=str)


if __name__ == "__main__":
  main()
