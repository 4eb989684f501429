"""The benchmarks' option values that are more than a flag's type: parsed here, in a module that defines no absl
flags (bench_step and bench_video both use them; the tests import them beside the converter's flags)."""

from __future__ import annotations


def parse_window_tuning(value: str) -> dict:
  """``--window_tuning`` FORM=N:W,... -> {form: (problems a program, warps)}; a bad entry is a ValueError."""
  out = {}
  for item in filter(None, (x.strip() for x in value.split(","))):
    form, _, rest = item.partition("=")
    nh, _, w = rest.partition(":")
    if form not in ("merged", "blocked") or not (nh.isdigit() and w.isdigit()):
      raise ValueError(f"--window_tuning entry {item!r}, expected merged=N:W or blocked=N:W")
    if int(nh) not in (1, 2, 4, 8) or int(w) not in (1, 2, 4, 8, 16):
      raise ValueError(f"--window_tuning entry {item!r}: N in 1, 2, 4, 8 and W in 1, 2, 4, 8, 16")
    out[form] = (int(nh), int(w))
  return out


def parse_run(item: str) -> tuple[str, int, dict]:
  """One --runs entry -> (sampler, steps, options); a bad entry is a ValueError naming it."""
  sampler, steps, *how = item.split(":")
  opts = {"sequential": False, "chunk": None, "kernel": None}
  for h in how:
    key, _, value = h.partition("=")
    if h == "sequential":
      opts["sequential"] = True
    elif key == "chunk" and value.isdigit():
      opts["chunk"] = int(value)
    elif key == "kernel" and value in ("on", "off", "merged"):
      opts["kernel"] = value
    else:
      raise ValueError(f"--runs entry {item!r}: option {h!r}, expected sequential, chunk=N or kernel=on|off|merged")
  if not steps.strip().isdigit():
    raise ValueError(f"--runs entry {item!r}: steps {steps!r}, expected a whole number")
  return sampler.strip(), int(steps), opts
