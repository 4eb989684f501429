r"""Summarise a JAX profiler trace (``perfetto_trace.json.gz``): GPU kernel time by kind, communication.

  python -m benchmarks.trace_summary TRACE_DIR_OR_FILE [--steps N] [--top 25]

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes the trace as Chrome-trace JSON. On a GPU each
device is a process (``/device:GPU:N``) whose CUDA-stream threads (``Stream #...``) hold one event per
kernel; other threads of the device process (``XLA Ops``, ``XLA Modules``, ``Steps``) are derived views of
the same time and are not summed. Per device this reports the kernel time of each kind (matmul, conv,
fused attention, communication, memory copies, other fusions) per step, the busy time (the union of all
kernel intervals), the span from the first to the last kernel, and how much of the communication kernels'
time no other kernel overlapped (``comm_exposed``: the time NCCL alone was running, which includes a
kernel waiting for its peer).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
from collections.abc import Iterable

# Order matters: the first pattern that matches a kernel's name decides its kind.
KINDS: tuple[tuple[str, re.Pattern], ...] = (
  ("comm", re.compile(r"nccl|all_?gather|all_?reduce|collective|permute|sendrecv", re.I)),
  ("attention", re.compile(r"fmha|flash|sdpa|attn|attention|softmax_fused", re.I)),
  ("conv", re.compile(r"conv|fprop|dgrad|wgrad|implicit_?gemm|winograd", re.I)),
  ("matmul", re.compile(r"gemm|nvjet|cutlass|matmul|xmma|cublas|dot", re.I)),
  ("memcpy", re.compile(r"memcpy|memset|copy_", re.I)),
  ("reduce", re.compile(r"reduce|reduction", re.I)),
)


def kind_of(name: str) -> str:
  for kind, pat in KINDS:
    if pat.search(name):
      return kind
  return "other"


def find_trace(path: str | pathlib.Path) -> pathlib.Path:
  """The newest ``perfetto_trace.json.gz`` under ``path`` (or ``path`` itself if it is a file)."""
  p = pathlib.Path(path)
  if p.is_file():
    return p
  found = sorted(p.rglob("perfetto_trace.json*"), key=lambda q: q.stat().st_mtime)
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json(.gz) under {p}")
  return found[-1]


def load_events(path: str | pathlib.Path) -> list[dict]:
  p = find_trace(path)
  opener = gzip.open if p.suffix == ".gz" else open
  with opener(p, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
  out: list[list[float]] = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return [(a, b) for a, b in out]


def _length(intervals: Iterable[tuple[float, float]]) -> float:
  return sum(b - a for a, b in intervals)


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
  """Length of the union ``a`` not covered by the union ``b`` (both sorted, disjoint)."""
  total, j = 0.0, 0
  for s, e in a:
    cur = s
    while j < len(b) and b[j][1] <= cur:
      j += 1
    k = j
    while k < len(b) and b[k][0] < e:
      if b[k][0] > cur:
        total += b[k][0] - cur
      cur = max(cur, b[k][1])
      k += 1
    if cur < e:
      total += e - cur
  return total


def summarize(events: list[dict], steps: int = 1, top: int = 25) -> dict:
  """Per GPU device: kernel milliseconds per step by kind, busy, span, exposed communication, top kernels."""
  proc_names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread_names = {
    (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  per_dev: dict[str, list[dict]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    proc = proc_names.get(e["pid"], "")
    if "GPU" not in proc:
      continue
    if not thread_names.get((e["pid"], e.get("tid")), "").startswith("Stream"):
      continue
    per_dev[proc].append(e)
  out = {}
  for dev in sorted(per_dev):
    evs = per_dev[dev]
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    comm, rest = [], []
    for e in evs:
      k = kind_of(e["name"])
      by_kind[k] += e["dur"]
      by_name[e["name"]][0] += e["dur"]
      by_name[e["name"]][1] += 1
      iv = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
      (comm if k == "comm" else rest).append(iv)
    comm_u, rest_u = _union(comm), _union(rest)
    all_u = _union(comm + rest)
    start = min(e["ts"] for e in evs)
    end = max(e["ts"] + e["dur"] for e in evs)
    ms = 1e-3 / steps  # trace times are microseconds
    kernel_total = sum(by_kind.values())
    out[dev] = {
      "kernels": len(evs) / steps,
      "kernel_ms": kernel_total * ms,
      "by_kind_ms": {k: v * ms for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "busy_ms": _length(all_u) * ms,
      "span_ms": (end - start) * ms,
      "comm_ms": _length(comm_u) * ms,
      "comm_exposed_ms": _minus(comm_u, rest_u) * ms,
      "top": [
        {"name": n[:160], "ms": v[0] * ms, "count": v[1] / steps, "kind": kind_of(n)}
        for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
      ],
    }
  return out


def format_summary(summary: dict, top: int = 12) -> str:
  lines = []
  for dev, s in summary.items():
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in s["by_kind_ms"].items())
    lines.append(
      f"{dev}: kernels {s['kernel_ms']:.1f} ms/step ({s['kernels']:.0f}), busy {s['busy_ms']:.1f}, "
      f"span {s['span_ms']:.1f}, comm {s['comm_ms']:.1f} (exposed {s['comm_exposed_ms']:.1f}); {kinds}"
    )
    for t in s["top"][:top]:
      lines.append(f"    {t['ms']:8.2f} ms {t['count']:6.0f}x  {t['kind']:<9} {t['name'][:110]}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("trace", help="a trace directory (searched for perfetto_trace.json.gz) or the file")
  ap.add_argument("--steps", type=int, default=1, help="steps the trace holds (figures are per step)")
  ap.add_argument("--top", type=int, default=25, help="kernels listed per device")
  ap.add_argument("--json", default="", help="write the summary here")
  a = ap.parse_args(argv)
  s = summarize(load_events(a.trace), a.steps, a.top)
  print(format_summary(s, a.top))
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(s, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
