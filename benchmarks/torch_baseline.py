"""bench_step's PyTorch baseline: torch_unet3d_baseline.py (diffusers, eager / torch.compile) in a subprocess."""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from benchmarks.bench_step import BenchConfig

TORCH_BASELINE = pathlib.Path(__file__).resolve().with_name("torch_unet3d_baseline.py")

_TORCH_LINE = re.compile(
  r"F=\s*(\d+)\s+step\(CFG\)=\s*([\d.]+)\s*ms\s+per-frame-step=\s*([\d.]+)\s*ms\s+peak=\s*([\d.]+)\s*GiB"
)


def parse_torch_output(text: str) -> list[dict]:
  return [
    {"frames": int(m[1]), "ms_per_step": float(m[2]), "ms_per_frame_step": float(m[3]), "peak_gib": float(m[4])}
    for m in _TORCH_LINE.finditer(text)
  ]


def run_torch_baseline(frames: Sequence[int], dtype: str, compile_: bool, timeout_s: int) -> dict:
  """One run of the baseline script; {'rows': [...]} or {'error': ...} with the end of its output."""
  cmd = [sys.executable, str(TORCH_BASELINE), dtype, ",".join(str(f) for f in frames)] + (
    ["compile"] if compile_ else []
  )
  out = {"command": shlex.join(cmd), "mode": "compile" if compile_ else "eager", "dtype": dtype}
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except (subprocess.TimeoutExpired, OSError) as err:
    out["error"] = f"{type(err).__name__}: {err}"
    return out
  out["wall_s"] = time.perf_counter() - t0
  out["rows"] = parse_torch_output(p.stdout)
  if p.returncode or not out["rows"]:
    tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
    out["error"] = f"exit code {p.returncode}, {len(out['rows'])} result lines; last lines:\n" + "\n".join(tail)
  return out


def run_baselines(bc: BenchConfig) -> list[dict]:
  """The eager run (and with --torch_compile the torch.compile one) of the baseline, each summarised in a line.

  Run before JAX has taken (by default 75% of) the GPU's memory.
  """
  modes = [False, True] if bc.torch_compile else [False]
  runs = [run_torch_baseline(bc.torch_frames, bc.torch_dtype, c, bc.torch_timeout_s) for c in modes]
  for b in runs:
    print(f"torch baseline ({b['mode']}): " + (b.get("error") or f"{len(b['rows'])} rows, {b['wall_s']:.0f} s"))
  return runs


def torch_ratios(runs: Sequence[dict], baselines: Sequence[dict]) -> list[dict]:
  """PyTorch ms per frame-step over ours (one device, the same F): > 1 means we are faster."""
  ours = {r["frames_per_device"]: r["ms_per_frame_step"] for r in runs if r["ok"] and r["devices"] == 1}
  out = []
  for b in baselines:
    for row in b.get("rows", []):
      if row["frames"] in ours:
        out.append(
          {
            "frames": row["frames"],
            "mode": b["mode"],
            "torch_ms_per_frame_step": row["ms_per_frame_step"],
            "ours_ms_per_frame_step": ours[row["frames"]],
            "ratio": row["ms_per_frame_step"] / ours[row["frames"]],
          }
        )
  return out
