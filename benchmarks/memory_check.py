r"""One video under a device memory budget: the memory plan against the measured peak (one process per budget).

  python -m benchmarks.memory_check --budget_gib 24 --out run.json -- --flagfile configs/long_video.flags \
      --weights= --model=videocrafter2 --steps=2 --output=/tmp/v.mp4

``--budget_gib`` limits the XLA client's memory to that many GiB of the card (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
set before JAX starts; 0: the card's own 95%), as a card of that size would offer. The rest are
``vinf_jax.sample`` flags; the chunks are the defaults' (``auto``) unless given. Writes the chunks chosen,
the planned and the measured peak (``memory_stats()['peak_bytes_in_use']`` of the device after the run), the
ms per frame-step and the timings, or the one-line error when the run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _limit_memory(budget_gib: float) -> None:
  import subprocess

  if budget_gib <= 0:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    return
  total = subprocess.run(
    ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True
  ).stdout.split()[0]
  os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{budget_gib * 1024 / float(total):.4f}"  # MiB of the card


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget_gib", type=float, default=0.0)
  p.add_argument("--out", required=True)
  p.add_argument("sample_flags", nargs="*")
  a = p.parse_args(argv)
  _limit_memory(a.budget_gib)
  import jax

  from vinf_jax import pipeline, sample

  sample.parse_flags(["sample", *a.sample_flags])
  sample.quiet_logs(False)
  cfg = sample.config_from_flags()
  row = {"budget_gib": a.budget_gib, "flags": a.sample_flags, "card": jax.devices()[0].device_kind}
  row["date"] = time.strftime("%Y-%m-%d")
  try:
    plan = pipeline.validate(cfg)
    row["plan"] = plan.memory.as_dict()
    res = pipeline.generate(cfg)
    tm = res.sidecar["timings_s"]
    row["timings_s"] = tm
    row["ms_per_frame_step"] = 1e3 * tm["denoise"] / (cfg.frames * res.steps_done)
  except Exception as err:  # noqa: BLE001 -- the row records how the run ended
    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:600]}"
  stats = jax.devices()[0].memory_stats() or {}
  row["measured_peak"] = stats.get("peak_bytes_in_use")
  row["bytes_limit"] = stats.get("bytes_limit")
  if row.get("plan") and row["measured_peak"]:
    row["plan_over_measured"] = row["plan"]["peak"] / row["measured_peak"]
  with open(a.out, "w") as f:
    json.dump(row, f, indent=1)
  print(json.dumps({k: v for k, v in row.items() if k not in ("plan", "flags")}))
  return row


if __name__ == "__main__":
  main(sys.argv[1:])
