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
  MAX: ["date", "card", "D", "attention", "fits", "fails", "complete", "command"],
  VIDEO: [
    "date",
    "card",
    "D",
    "frames",
    "steps",
    "load s",
    "compile s",
    "encode s",
    "denoise s",
    "decode s",
    "write s",
    "excl. compile s",
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
    # the plain step (no --frame_chunk: chunked rows measure the memory mode, and stay in RESULTS.md)
    rows = sorted(
      (r for r in step if r["date"] == newest and "--frame_chunk" not in r["command"]),
      key=lambda r: (r["card"], int(r["D"]), int(r["F"])),
    )
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
    newest = {}  # the newest row of each (card, D, attention), in the order of D
    for r in sorted(t[MAX], key=lambda r: (int(r["D"]), r["date"])):
      newest[r["card"], r["D"], r["attention"]] = r
    notes.append(
      "Largest frame count in one pass (one guided step of the whole video): "
      + ", ".join(
        f"{'at least ' if r['fails'] in (NONE_FAILED, NONE_RUN) else ''}{r['fits']} on {r['D']} x {r['card']} "
        f"({r['attention']} attention)"
        for r in newest.values()
      )
      + "."
    )
  if t[VIDEO]:
    # of each (card, D, frames, steps), guided samplers first: the newest command's first row (the first run of
    # its process, whose compile was cold; later rows of one command reuse its programs)
    key = lambda r: (r["card"], r["D"], r["frames"], r["steps"])
    first = {}
    for r in sorted(t[VIDEO], key=lambda r: ("turbo" in r["steps"], int(r["D"]), r["date"])):  # stable sort
      held = first.get(key(r))
      if held is None or held["command"] != r["command"]:
        first[key(r)] = r
    shown = list(first.values())
    notes.append(
      "Text to written video, 320x512, excluding compilation (compile cold): "
      + ", ".join(
        f"{r['frames']} frames in {r['steps']} steps on {r['D']} x {r['card']} in {r['excl. compile s']} s "
        f"({r['compile s']} s)"
        for r in shown
      )
      + "."
    )
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


def torch_baselines(results: Sequence[dict]) -> list[dict]:
  """The PyTorch baseline runs of bench_step JSONs of one call, each marked with its file's command."""
  return [b | {"in": r["meta"]["command"]} for r in results for b in r.get("torch_baseline", []) if b.get("rows")]


def rows_from_json(res: dict, baselines: Sequence[dict] | None = None) -> dict[str, list[str]]:
  """RESULTS.md rows (markdown lines) of one ``bench_step`` JSON, per section.

  ``baselines``: PyTorch baseline runs of the same call (:func:`torch_baselines` of its JSONs); default
  the file's own. A ratio from another file of the call (the baseline run on another GPU of the machine
  while this file's runs went on) is marked with a star.
  """
  m = res["meta"]
  if res.get("skipped") or "device_kind" not in m:
    return {STEP: [], WEAK: [], MAX: []}  # a baseline-only file: its figures show up as ratios
  date, card, cmd = m["date"][:10], m["device_kind"], f"`{m['command']}`"
  ratios: dict[int, list[str]] = {}
  if baselines is None:
    baselines = torch_baselines([res])
  ours = {r["frames_per_device"]: r["ms_per_frame_step"] for r in res["runs"] if r["ok"] and r["devices"] == 1}
  for b in baselines:
    for row in b["rows"]:
      if row["frames"] in ours:
        star = "" if b["in"] == m["command"] else "*"
        ratios.setdefault(row["frames"], []).append(
          f"{b['mode']}{star} {row['ms_per_frame_step'] / ours[row['frames']]:.2f}x"
        )
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
    att, d = m["temporal"]["attention"], mf.get("devices", 1)  # frames per device in the JSON, in all here
    fits = d * mf["largest_fit"] if mf["largest_fit"] else "-"
    fails = d * mf["smallest_fail"] if mf["smallest_fail"] else NONE_FAILED if mf["complete"] else NONE_RUN
    out[MAX].append(_row([date, card, d, att, fits, fails, mf["complete"], cmd]))
  return out


NONE_FAILED = "none up to the search limit"
NONE_RUN = "none run out of memory (search cut short)"


def rows_from_video_json(res: dict) -> list[str]:
  """The RESULTS.md video rows of one ``bench_video --json`` file: one, or one per run of ``--runs`` (a
  ``--compile_only`` run has none). Steps of the turbo sampler read ``4 turbo``."""
  if "runs" in res:
    return [row for run in res["runs"] for row in rows_from_video_json(run)]
  if res.get("compile_only"):
    return []
  tm = res["timings_s"]
  cmd = "`python -m benchmarks.bench_video " + " ".join(res["command"].split()[1:]) + "`"
  steps = round(tm["denoise"] / res["ms_per_frame_step"] * 1e3 / res["frames"])
  return [
    _row(
      [
        res["date"],
        res["devices"]["kind"],
        res["devices"]["count"],
        res["frames"],
        f"{steps} turbo" if res.get("sampler") == "turbo" else steps,
        f"{tm['load']:.1f}",
        f"{res['compile_s']:.1f}",
        f"{tm['encode']:.1f}",
        f"{tm['denoise']:.1f}",
        f"{tm['decode']:.1f}",
        f"{tm['write']:.1f}",
        f"{res['excluding_compile_s']:.1f}",
        cmd,
      ]
    )
  ]


def weak_scaling_across(results: Sequence[dict]) -> list[str]:
  """Weak-scaling rows pairing runs of different bench_step JSONs of one call (same card and settings):
  one process per device count run side by side on disjoint GPUs of one machine. t1 is the one-device
  time at F frames, tD the D-device time at F frames per device."""

  def key(res):
    m = res["meta"]
    return (m["device_kind"], json.dumps(m["temporal"], sort_keys=True), m["frame_chunk"], m["unet"]["dtype"])

  ones = {}
  for res in results:
    for r in res["runs"]:
      if r["ok"] and r["devices"] == 1:
        ones[(key(res), r["frames_per_device"])] = (r, res)
  rows = []
  for res in results:
    for r in res["runs"]:
      one = ones.get((key(res), r["frames_per_device"]))
      if not r["ok"] or r["devices"] == 1 or one is None or one[1] is res:
        continue  # same-file pairs are in that file's own weak-scaling rows
      r1, res1 = one
      cmd = f"`{res1['meta']['command']}` and `{res['meta']['command']}`"
      eff = r1["ms_per_step"] / r["ms_per_step"]
      m = res["meta"]
      rows.append(
        _row(
          [
            m["date"][:10],
            m["device_kind"],
            r["frames_per_device"],
            r["devices"],
            f"{r1['ms_per_step']:.1f}",
            f"{r['ms_per_step']:.1f}",
            f"{eff:.1%}",
            cmd,
          ]
        )
      )
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = ap.add_mutually_exclusive_group()
  g.add_argument("--check", metavar="README", help="fail when README's results block differs from render()")
  g.add_argument("--write", metavar="README", help="rewrite README's results block")
  g.add_argument(
    "--rows", metavar="JSON", nargs="+", help="print RESULTS.md rows for bench_step / bench_video JSON files of a call"
  )
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
      results = [json.loads(pathlib.Path(path).read_text()) for path in a.rows]
      baselines = torch_baselines([r for r in results if "meta" in r])
      is_video = lambda r: "timings_s" in r or ("runs" in r and "meta" not in r)  # bench_step's JSON has "meta"
      videos = [(p, r) for p, r in zip(a.rows, results, strict=True) if is_video(r)]
      results = [r for r in results if not is_video(r)]
      for path, res in videos:
        rows = rows_from_video_json(res)
        if rows:
          print(f"## {VIDEO}  ({path})\n" + "\n".join(rows) + "\n")
      for path, res in zip([p for p in a.rows if p not in dict(videos)], results, strict=True):
        for section, rows in rows_from_json(res, baselines).items():
          if rows:
            print(f"## {section}  ({path})\n" + "\n".join(rows) + "\n")
      across = weak_scaling_across(results)
      if across:
        print(f"## {WEAK}  (across the files)\n" + "\n".join(across) + "\n")
    else:
      print(render(a.results))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
