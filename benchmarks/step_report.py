"""bench_step's report: the result dict and its JSON file (saved as it grows), the run lines, the summary table."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from benchmarks.bench_step import BenchConfig


def versions() -> dict:
  import flax
  import jax
  import jaxlib

  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": getattr(jaxlib, "__version__", None),
    "flax": flax.__version__,
  }


def new_result(bc: BenchConfig, argv: Sequence[str], compiler_options: dict) -> dict:
  """The result of one invocation before any measurement: its settings ('meta') and no runs yet."""
  return {
    "meta": {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "command": shlex.join(["python", "-m", "benchmarks.bench_step", *argv[1:]]),
      "versions": versions(),
      "env": {
        k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")
      },
      "preset": bc.preset,
      "unet": dataclasses.asdict(bc.unet),
      "video": [bc.height, bc.width],
      "latent": list(bc.latent_hw),
      "temporal": dataclasses.asdict(bc.temporal),
      "sampler": dataclasses.asdict(bc.sampler),
      "frame_chunk": bc.frame_chunk,
      "steps_timed": bc.steps,
      "compilation_cache": bc.compilation_cache or None,
      "time_budget_s": bc.time_budget_s or None,
      "compiler_options": compiler_options,
    },
    "runs": [],
  }


class ResultFile:
  """The result dict ``res`` and the JSON file ``out`` ('' for none) that every ``save`` rewrites with it."""

  def __init__(self, res: dict, out: str):
    self.res = res
    self.out = out

  def save(self) -> None:
    if self.out:
      p = pathlib.Path(self.out)
      p.parent.mkdir(parents=True, exist_ok=True)
      p.write_text(json.dumps(self.res, indent=1, default=_json_default) + "\n")

  @contextlib.contextmanager
  def on_record(self, where: dict, key: str, value):
    """``where[key] = value`` in the saved JSON while the block runs: a call cut off there leaves it on record."""
    where[key] = value
    self.save()
    try:
      yield
    finally:
      del where[key]


def _json_default(o):
  if isinstance(o, (np.integer, np.floating, np.bool_)):
    return o.item()
  if isinstance(o, (tuple, set)):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_line(r: dict) -> str:
  """The line printed as a (D, F) run ends."""
  if not r["ok"]:
    kind = "OOM" if r.get("oom") else "skipped" if r.get("skipped") else "error"
    return f"D={r['devices']} F={r['frames_per_device']}: {kind}: {r['error'][:300]}"
  return (
    f"D={r['devices']} F={r['frames_per_device']}: compile {r['compile_s']:.1f} s, {r['ms_per_step']:.1f} ms/step, "
    f"{r['ms_per_frame_step']:.2f} ms/frame-step"
  )


def _fmt(v, spec: str, scale: float = 1.0) -> str:
  return "-" if v is None else format(v * scale, spec)


def format_table(res: dict) -> str:
  """The human-readable summary printed at the end."""
  m = res["meta"]
  if "device_kind" not in m:  # no JAX runs (--devices=): the baseline only
    return "\n".join(
      f"torch baseline ({b['mode']}): "
      + (b.get("error") or ", ".join(f"F={r['frames']} {r['ms_per_frame_step']:.2f} ms/frame-step" for r in b["rows"]))
      for b in res.get("torch_baseline", [])
    )
  return "\n".join(_header_lines(res) + _run_rows(res["runs"]) + _summary_lines(res))


def _header_lines(res: dict) -> list[str]:
  """The table's title (device, versions, command, settings, matmul rate) and its column heads."""
  m = res["meta"]
  t = m["temporal"]
  att = f"dual P={t['window']} G={t['num_global']}" if t["attention"] == "dual" else "full"
  return [
    "",
    f"== bench_step {m['date']}: {m['device_kind']} ({m['backend']}), jax {m['versions']['jax']}, "
    f"flax {m['versions']['flax']}",
    f"   {m['command']}",
    f"   {m['preset']} {m['unet']['dtype']} {m['video'][0]}x{m['video'][1]} (latent {m['latent'][0]}x"
    f"{m['latent'][1]}), {att}, {m['sampler']['name']} CFG {m['sampler']['guidance']:g}, "
    f"median of {m['steps_timed']} steps; weights: init {m['init_s']:.1f} s",
    f"   matmul {res['matmul']['size']}^3 {res['matmul']['dtype']}: {res['matmul']['flops'] / 1e12:.1f} TFLOP/s "
    f"(MFU's denominator); datasheet {_fmt(m['datasheet_bf16_flops'], '.0f', 1e-12)} TFLOP/s",
    "",
    f"{'D':>2} {'F':>5} {'compile s':>9} {'ms/step':>9} {'ms/frame':>9} {'TFLOP/step':>10} {'xla/an':>6} "
    f"{'MFU':>5} {'MFU(ds)':>7} {'peak GiB':>8}",
  ]


def _run_rows(runs: Sequence[dict]) -> list[str]:
  """One table row per (D, F) run, and the note under them."""
  lines = []
  for r in runs:
    if not r["ok"]:
      kind = "OOM" if r.get("oom") else "skipped" if r.get("skipped") else "error"
      lines.append(f"{r['devices']:>2} {r['frames_per_device']:>5}  {kind}: {r['error'].splitlines()[0][:80]}")
      continue
    lines.append(
      f"{r['devices']:>2} {r['frames_per_device']:>5} {r['compile_s']:>9.1f} {r['ms_per_step']:>9.1f} "
      f"{r['ms_per_frame_step']:>9.2f} {r['flops_analytic'] / 1e12:>10.1f} {_fmt(r['xla_over_analytic'], '6.2f')} "
      f"{_fmt(r['mfu'], '5.1%')} {_fmt(r['mfu_datasheet'], '7.1%')} "
      f"{_fmt(r['memory']['peak_bytes'], '8.1f', 2**-30)}"
    )
  lines.append("   TFLOP/step: analytic, per device; xla/an: XLA's count over the analytic count of what runs")
  return lines


def _summary_lines(res: dict) -> list[str]:
  """Weak scaling, the max-frames search, the PyTorch baseline's errors and its ratios to ours."""
  lines = []
  if res.get("weak_scaling"):
    lines.append(
      "weak scaling (t1 / tD, F frames per device): "
      + ", ".join(f"F={w['frames_per_device']} D={w['devices']}: {w['efficiency']:.1%}" for w in res["weak_scaling"])
    )
  if "max_frames" in res:
    mf = res["max_frames"]
    where = f"max frames per device on {mf.get('devices', 1)} device(s)"
    if "error" in mf:
      lines.append(f"{where}: error: {mf['error'][:200]}")
    else:
      probes = " ".join(f"{p['frames']}{'+' if p['fits'] else 'x'}" for p in mf["probes"])
      lines.append(
        f"{where}: {mf['largest_fit']} fits, {mf['smallest_fail']} does not "
        f"({'complete' if mf['complete'] else 'INCOMPLETE'}; probes {probes}; guess {mf['guess']}; "
        f"{mf['seconds']:.0f} s)"
      )
  for b in res.get("torch_baseline", []):
    if b.get("error"):
      lines.append(f"torch baseline ({b['mode']}): ERROR {b['error']}")
  for r in res.get("torch_ratio", []):
    lines.append(
      f"torch {r['mode']} / ours at F={r['frames']} (1 device): {r['torch_ms_per_frame_step']:.2f} / "
      f"{r['ours_ms_per_frame_step']:.2f} ms per frame-step = {r['ratio']:.2f}x"
    )
  return lines
