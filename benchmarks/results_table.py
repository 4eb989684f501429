"""The README's results summary, rendered from the tables of benchmarks/RESULTS.md.

  python -m benchmarks.results_table                       # print the summary block
  python -m benchmarks.results_table --check README.md     # exit 1 when README's block differs from it
  python -m benchmarks.results_table --write README.md     # rewrite README's block
  python -m benchmarks.results_table --rows bench_step.json  # RESULTS.md rows for a bench_step JSON

The README's block sits between ``<!-- results:begin -->`` and ``<!-- results:end -->``. RESULTS.md is the
record (every row with card, date and command); the README shows the newest step-benchmark session and
the newest weak-scaling and max-frames rows, so it can never hold a figure RESULTS.md does not.
"""

from __future__ import annotations

import argparse
import difflib
import json
import pathlib
import sys
from collections.abc import Sequence

RESULTS_MD = pathlib.Path(__file__).resolve().with_name("RESULTS.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

STEP = "Step benchmark"
WEAK = "Weak scaling"
MAX = "Max frames"
VIDEO = "Video benchmark"
COLUMNS = {
  STEP: [
    "date",
    "card",
    "D",
    "F",
    "ms/step",
    "ms/frame-step",
    "TFLOP/step",
    "XLA/analytic",
    "MFU",
    "MFU (989)",
    "peak GiB",
    "compile s",
    "torch/ours",
    "command",
  ],
  WEAK: ["date", "card", "F", "D", "t1 ms", "tD ms", "efficiency", "command"],
  MAX: ["date", "card", "attention", "fits", "fails", "complete", "command"],
  VIDEO: [
    "date",
    "card",
    "D",
    "frames",
    "resolution",
    "steps",
    "denoise s",
    "decode s",
    "total s",
    "command",
  ],
}


# ------------------------------------------------------------------------------------------------
# Markdown tables


def _cells(line: str) -> list[str]:
  """Cells of a table row; ``\\|`` is a literal pipe (commands may hold one)."""
  body = line.strip().removeprefix("|").removesuffix("|")
  parts, cur, i = [], "", 0
  while i < len(body):
    if body[i] == "\\" and body[i + 1 : i + 2] == "|":
      cur, i = cur + "|", i + 2
      continue
    if body[i] == "|":
      parts.append(cur.strip())
      cur = ""
    else:
      cur += body[i]
    i += 1
  return [*parts, cur.strip()]


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
  """``{section: rows}`` for the first table under each ``## section`` heading (rows as header -> cell).

  Raises ValueError when a section of COLUMNS is missing or its header is not COLUMNS' (render() reads
  cells by these names).
  """
  rows: dict[str, list[dict[str, str]]] = {}
  headers: dict[str, list[str]] = {}
  section, in_table = None, False
  for line in text.splitlines():
    if line.startswith("## "):
      section, in_table = line[3:].strip(), False
      continue
    is_row = line.lstrip().startswith("|")
    if section is None or not is_row:
      in_table = False
      continue
    cells = _cells(line)
    if section not in headers:
      headers[section], rows[section], in_table = cells, [], True
    elif in_table and not all(set(c) <= set("-: ") for c in cells):  # skip the separator row
      if len(cells) != len(headers[section]):
        raise ValueError(f"{section}: a row has {len(cells)} cells, the header {len(headers[section])}: {line!r}")
      rows[section].append(dict(zip(headers[section], cells, strict=True)))
  for name, cols in COLUMNS.items():
    if name not in headers:
      raise ValueError(f"RESULTS.md has no table under '## {name}'")
    if headers[name] != cols:
      raise ValueError(f"'## {name}' columns are {headers[name]}, expected {cols}")
  return rows


def _row(cells: Sequence[object]) -> str:
  return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


# ------------------------------------------------------------------------------------------------
# README block


def render(results_md: str | pathlib.Path = RESULTS_MD) -> str:
  """The README's summary block (without the marker lines) from RESULTS.md's tables."""
  t = parse_tables(pathlib.Path(results_md).read_text())
  lines = []
  step = t[STEP]
  if step:
    newest = max(r["date"] for r in step)
    rows = sorted((r for r in step if r["date"] == newest), key=lambda r: (r["card"], int(r["D"]), int(r["F"])))
    lines += [
      f"One guided denoising step of the full-size UNet at 320x512 (measured {newest}; "
      "[benchmarks/RESULTS.md](benchmarks/RESULTS.md) has every figure with its command):",
      "",
      _row(["card", "GPUs", "frames per GPU", "ms per frame-step", "MFU", "PyTorch / ours"]),
      _row(["---"] * 6),
    ]
    lines += [_row([r["card"], r["D"], r["F"], r["ms/frame-step"], r["MFU"], r["torch/ours"]]) for r in rows]
  else:
    lines.append("No GPU figures recorded yet ([benchmarks/RESULTS.md](benchmarks/RESULTS.md)).")
  notes = []
  if t[WEAK]:
    newest = max(r["date"] for r in t[WEAK])
    notes.append(
      "Weak scaling (t1 / tD at equal frames per GPU): "
      + ", ".join(f"{r['efficiency']} at D={r['D']}, F={r['F']}" for r in t[WEAK] if r["date"] == newest)
      + f" ({t[WEAK][-1]['card']})."
    )
  if t[MAX]:
    r = max(t[MAX], key=lambda r: r["date"])
    notes.append(f"Largest frame count one {r['card']} holds ({r['attention']} attention): {r['fits']}.")
  if notes:
    lines += ["", *notes]
  return "\n".join(lines)


def readme_block(text: str) -> str:
  if BEGIN not in text or END not in text:
    raise ValueError(f"no {BEGIN} ... {END} block")
  return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def check(readme: str | pathlib.Path, results_md: str | pathlib.Path = RESULTS_MD) -> list[str]:
  """Differences between README's block and render() (empty when they agree)."""
  got = readme_block(pathlib.Path(readme).read_text())
  want = render(results_md)
  if got.strip() == want.strip():
    return []
  return list(difflib.unified_diff(got.splitlines(), want.splitlines(), "README block", "render()", lineterm=""))


def write(readme: str | pathlib.Path, results_md: str | pathlib.Path = RESULTS_MD) -> None:
  p = pathlib.Path(readme)
  text = p.read_text()
  readme_block(text)  # the markers must be there
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  p.write_text(f"{head}{BEGIN}\n{render(results_md)}\n{END}{tail}")


# ------------------------------------------------------------------------------------------------
# RESULTS.md rows from a bench_step JSON


def _f(v, spec: str, scale: float = 1.0) -> str:
  return "-" if v is None else format(v * scale, spec)


def rows_from_json(res: dict) -> dict[str, list[str]]:
  """RESULTS.md rows (markdown lines) of one ``bench_step`` JSON, per section."""
  m = res["meta"]
  date, card, cmd = m["date"][:10], m["device_kind"], f"`{m['command']}`"
  ratios: dict[int, list[str]] = {}
  for r in res.get("torch_ratio", []):
    ratios.setdefault(r["frames"], []).append(f"{r['mode']} {r['ratio']:.2f}x")
  out = {STEP: [], WEAK: [], MAX: []}
  for r in res["runs"]:
    if not r["ok"]:
      continue
    out[STEP].append(
      _row(
        [
          date,
          card,
          r["devices"],
          r["frames_per_device"],
          f"{r['ms_per_step']:.1f}",
          f"{r['ms_per_frame_step']:.2f}",
          f"{r['flops_analytic'] / 1e12:.1f}",
          _f(r.get("xla_over_analytic"), ".2f"),
          _f(r.get("mfu"), ".1%"),
          _f(r.get("mfu_datasheet"), ".1%"),
          _f(r["memory"]["peak_bytes"], ".1f", 2**-30),
          "-" if r.get("compile_cache") == "hit" else f"{r['compile_s']:.0f}",  # a cache load is no compile
          (", ".join(ratios.get(r["frames_per_device"], [])) if r["devices"] == 1 else "") or "-",
          cmd,
        ]
      )
    )
  for w in res.get("weak_scaling", []):
    out[WEAK].append(
      _row(
        [
          date,
          card,
          w["frames_per_device"],
          w["devices"],
          f"{w['t1_ms']:.1f}",
          f"{w['td_ms']:.1f}",
          f"{w['efficiency']:.1%}",
          cmd,
        ]
      )
    )
  mf = res.get("max_frames")
  if mf and "error" not in mf:
    att = m["temporal"]["attention"]
    out[MAX].append(_row([date, card, att, mf["largest_fit"] or "-", mf["smallest_fail"] or "-", mf["complete"], cmd]))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = ap.add_mutually_exclusive_group()
  g.add_argument("--check", metavar="README", help="fail when README's results block differs from render()")
  g.add_argument("--write", metavar="README", help="rewrite README's results block")
  g.add_argument("--rows", metavar="JSON", nargs="+", help="print RESULTS.md rows for bench_step JSON files")
  ap.add_argument("--results", default=str(RESULTS_MD), help="the RESULTS.md to render")
  a = ap.parse_args(argv)
  try:
    if a.check:
      diff = check(a.check, a.results)
      if diff:
        print(f"{a.check}: the results block differs from benchmarks/RESULTS.md's tables:", file=sys.stderr)
        print("\n".join(diff), file=sys.stderr)
        return 1
      print(f"{a.check}: results block up to date")
    elif a.write:
      write(a.write, a.results)
    elif a.rows:
      for path in a.rows:
        for section, rows in rows_from_json(json.loads(pathlib.Path(path).read_text())).items():
          if rows:
            print(f"## {section}  ({path})\n" + "\n".join(rows) + "\n")
    else:
      print(render(a.results))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
