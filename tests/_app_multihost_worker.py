"""One process of the app's multi-host test: ``python -m tests._app_multihost_worker PID PORT DIR``.

Two processes with 2 CPU devices each. Process 0 is the page's handler without the page: it runs one request
to the end and one cancelled after its first step, then closes; process 1 follows (``vinf_jax.app.follow``).
"""

import dataclasses
import json
import os
import sys


def main():
  pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

  from tests.test_app import BASE
  from vinf_jax import app, pipeline

  base = dataclasses.replace(BASE, num_devices=0)  # 8 frames: 4 on each of the 2 devices
  models = pipeline.load_models(base, log=lambda m: None)
  channel = app.Channel()
  assert channel.multi
  if pid != 0:
    n = app.follow(models, channel)
    print(f"process {pid}: followed {n} request(s)", flush=True)
    return
  handler = app.Handler(base, models, os.path.join(out, "outputs"), channel=channel, echo=False)
  done = handler.run({"prompts": "a koi pond in autumn", "seed": 5}, session="p")

  def cancel_after_first(step, total, desc):
    if step == 1:
      handler.cancel("p")

  cancelled = handler.run({"prompts": "a fox", "seed": 6}, session="p", progress=cancel_after_first)
  handler.finish()
  replies = [
    {"ok": done.ok, "status": done.status, "video": done.video, "sidecar": done.sidecar},
    {"ok": cancelled.ok, "status": cancelled.status, "video": cancelled.video},
  ]
  with open(os.path.join(out, "replies.json"), "w") as f:
    json.dump(replies, f)
  print(f"process {pid}: {done.status}; {cancelled.status}", flush=True)


if __name__ == "__main__":
  main()
