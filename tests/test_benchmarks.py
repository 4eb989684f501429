"""The step benchmark's logic on CPU (tiny UNet, fake devices), its analytic FLOP count, the results table."""

import json
import math
import sys

import numpy as np
import pytest

from benchmarks import bench_step, results_table, step_measure, step_report, torch_baseline
from benchmarks import flops as flops_lib
from vinf_jax import parallel
from vinf_jax.config import TINY, VIDEOCRAFTER2

F = 8  # frames per device: a 4-frame halo and the window P=4 fit; G=8 divides 8 and 16 frames

SMOKE_ARGS = [
  "--preset=tiny",
  "--dtype=float32",  # CPU: bf16 convolutions are emulated and slow
  "--height=64",  # latent 8x8: the tiny UNet downsamples by 8
  "--width=64",
  f"--frames={F}",
  "--devices=1,2",
  "--window=4",
  "--num_global=8",
  "--steps=2",
  "--sampling_steps=3",  # 1 warm-up + 2 timed steps: the state restarts once, outside the timing
  "--matmul_size=128",
  "--matmul_iters=2",
  # a third less compile time on CPU; the program (and XLA's FLOP count) is the same
  "--compiler_options=xla_backend_optimization_level=0,xla_llvm_disable_expensive_passes=true",
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench_step.json"
  trace = out.parent / "trace"
  assert bench_step.main(["bench_step", *SMOKE_ARGS, f"--out={out}", f"--trace_dir={trace}"]) == 0
  return json.loads(out.read_text())


def test_bench_step_smoke(smoke):
  m = smoke["meta"]
  assert m["device_kind"] and m["backend"] == "cpu" and m["device_count"] >= 2
  assert m["versions"]["jax"] and m["versions"]["flax"] and m["date"]
  assert "--devices=1,2" in m["command"]
  assert m["param_count"] == 5_364_708 and m["init_s"] > 0
  assert m["compiler_options"] == {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  assert m["datasheet_bf16_flops"] is None  # not an H100/H200
  assert smoke["matmul"]["flops"] > 0

  runs = smoke["runs"]
  assert [(r["devices"], r["frames_per_device"]) for r in runs] == [(1, F), (2, F)]
  for r in runs:
    assert r["ok"], r.get("error")
    assert r["finite"]
    assert r["frames_total"] == F * r["devices"]
    assert r["lower_s"] > 0 and r["compile_s"] > 0 and r["first_step_s"] > 0
    assert len(r["step_ms_all"]) == 2 and all(t > 0 for t in r["step_ms_all"])
    assert r["ms_per_step"] > 0 and math.isclose(r["ms_per_frame_step"], r["ms_per_step"] / F)
    assert r["flops_analytic"] == pytest.approx(
      flops_lib.step_flops(TINY.unet, 8, 8, F, window=4, num_global=8, num_shards=r["devices"])
    )
    # XLA counts the matmuls and convolutions of the executed analytic count (same convention: conv taps
    # on the padding left out) plus the elementwise work it leaves out (GroupNorm/LayerNorm, SiLU, the
    # erf of exact GELU, softmax, residuals, the sampler update): 11-12% at the tiny UNet's 32-64 channels
    # (3.5% for the full-size UNet at this latent, on CPU), which grows with neither frames nor devices.
    # Below 1 would mean a matmul counted that XLA does not run; above 1.25, a matmul left out.
    assert 1.0 <= r["xla_over_analytic"] <= 1.25, r["xla_over_analytic"]
    assert r["mfu"] > 0 and r["mfu_datasheet"] is None
    peak = r["memory"]["peak_bytes"]
    assert peak is None or peak > 0  # None on CPU
    assert r["xla_memory"] is None or r["xla_memory"]["total_bytes"] > 0
    # the trace was written (on CPU it holds no GPU device, so the summary has no device)
    assert r["trace"]["path"].endswith("perfetto_trace.json.gz") and f"D{r['devices']}_F{F}" in r["trace"]["path"]
    assert r["trace"]["steps"] == 2 and r["trace"]["devices"] == {}
  # the multi-device program recomputes the temporal conv halo: more work per device than one device
  assert runs[1]["flops_analytic_executed"] > runs[0]["flops_analytic_executed"]

  (w,) = smoke["weak_scaling"]
  assert w["devices"] == 2 and w["frames_per_device"] == F
  assert w["efficiency"] == pytest.approx(runs[0]["ms_per_step"] / runs[1]["ms_per_step"]) and w["efficiency"] > 0
  assert "max_frames" not in smoke and "torch_baseline" not in smoke
  text = step_report.format_table(smoke)
  assert "weak scaling" in text and "xla/an" in text


def test_analytic_flops_full_size():
  # shared/bench/README: about 0.76 TFLOP per frame per UNet pass at 40x64, 1.52 TFLOP per guided step.
  # Ours is 1.567 (+3%); 5% would catch a whole component left out or counted twice (resample 0.09,
  # spatial attention 0.10, init_attn 0.06 TFLOP per frame-step).
  per_frame = flops_lib.step_flops(VIDEOCRAFTER2.unet, 40, 64, 16, attention="full") / 16
  assert per_frame == pytest.approx(1.52e12, rel=0.05)
  parts = flops_lib.unet_flops(VIDEOCRAFTER2.unet, 40, 64, 1, attention="dual")
  assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
  # three stride-2 convs (320, 640, 1280 channels, each 2*9*c^2*m = 1.18 GFLOP) and three 3x3 convs after
  # the upsamples (1280 ch at 10x16 and 20x32, 640 ch at 40x64)
  down = 3 * 2 * 9 * 320**2 * 640
  up = 2 * 9 * (1280**2 * 160 + 1280**2 * 640 + 640**2 * 2560)
  assert parts["resample"] == down + up
  # dual: 2P+1+G keys whatever the length; full: every frame of the video
  dual = [flops_lib.unet_flops(VIDEOCRAFTER2.unet, 40, 64, n)["temporal_attention"] / n for n in (16, 256)]
  assert dual[0] == pytest.approx(dual[1])
  full = [
    flops_lib.unet_flops(VIDEOCRAFTER2.unet, 40, 64, n, attention="full")["temporal_attention"] / n for n in (16, 32)
  ]
  assert full[1] == pytest.approx(2 * full[0])
  # executed, XLA's way: on one device the temporal convs' taps on the zero padding do not count (3T - 2
  # of 3T), on several the exact block computes 12 extra frame-stages of the halo
  dense = flops_lib.unet_flops(VIDEOCRAFTER2.unet, 40, 64, 16)
  one = flops_lib.unet_flops(VIDEOCRAFTER2.unet, 40, 64, 16, executed=True)
  two = flops_lib.unet_flops(VIDEOCRAFTER2.unet, 40, 64, 16, executed=True, num_shards=2)
  assert one["temporal_conv"] == pytest.approx(dense["temporal_conv"] * (3 * 16 - 2) / (3 * 16))
  assert two["temporal_conv"] == pytest.approx(dense["temporal_conv"] * (4 * 16 + 12) / (4 * 16))
  # the resampling convs by hand: a stride-2 conv over n counts 3n/2 - 1 taps, a stride-1 one 3n - 2
  down = 320**2 * 59 * 95 + 640**2 * 29 * 47 + 1280**2 * 14 * 23
  up = 1280**2 * 28 * 46 + 1280**2 * 58 * 94 + 640**2 * 118 * 190
  assert flops_lib.unet_flops(VIDEOCRAFTER2.unet, 40, 64, 1, executed=True)["resample"] == 2 * (down + up)


def test_search_max_frames():
  calls = []

  def fits(f):
    calls.append(f)
    return f <= 900

  r = step_measure.search_max_frames(fits, step=64, limit=4096, known_fit=256)
  assert (r["largest_fit"], r["smallest_fail"], r["complete"]) == (896, 960, True)
  assert calls[0] == 512 and len(calls) == len(set(calls))
  # a good guess needs two probes
  calls.clear()
  r = step_measure.search_max_frames(fits, step=64, limit=4096, known_fit=256, guess=900)
  assert (r["largest_fit"], r["smallest_fail"]) == (896, 960) and calls == [896, 960]
  # the bracket so far after each probe
  parts = []
  step_measure.search_max_frames(
    fits,
    step=64,
    limit=4096,
    known_fit=256,
    guess=900,
    on_probe=lambda p: parts.append(dict(p, probes=len(p["probes"]))),
  )
  assert [(p["largest_fit"], p["smallest_fail"], p["probes"], p["complete"]) for p in parts] == [
    (896, None, 1, False),
    (896, 960, 2, False),
  ]
  # a guess too high gallops down
  r = step_measure.search_max_frames(fits, step=64, limit=4096, guess=2000)
  assert (r["largest_fit"], r["smallest_fail"], r["complete"]) == (896, 960, True)
  # everything up to the limit fits
  r = step_measure.search_max_frames(lambda f: True, step=64, limit=1000, known_fit=256)
  assert (r["largest_fit"], r["smallest_fail"], r["complete"]) == (960, None, True)
  # nothing fits
  r = step_measure.search_max_frames(lambda f: False, step=16, limit=1000)
  assert (r["largest_fit"], r["smallest_fail"]) == (None, 16)
  # out of time after two probes: an incomplete bracket
  t = iter(range(100))
  r = step_measure.search_max_frames(fits, step=64, limit=4096, known_fit=256, deadline=2, clock=lambda: next(t))
  assert not r["complete"] and len(r["probes"]) == 2
  # a probe must end before the deadline: with 10 s per probe and 25 s left, two probes start
  t = iter(range(0, 1000, 10))
  r = step_measure.search_max_frames(
    fits, step=64, limit=4096, known_fit=256, deadline=25, clock=lambda: next(t), reserve=lambda: 10
  )
  assert not r["complete"] and len(r["probes"]) == 2


def test_guess_max_frames():
  gib = 2**30

  def run(f, total):
    return {"ok": True, "devices": 1, "frames_per_device": f, "xla_memory": {"total_bytes": total},
            "memory": {"limit_bytes": 80 * gib}}  # fmt: skip

  # 4 GiB of weights and 0.1 GiB per frame: 0.97 * 80 GiB holds 736 frames
  assert step_measure.guess_max_frames([run(64, 4 * gib + 64 * gib // 10), run(256, 4 * gib + 256 * gib // 10)]) == 735
  assert step_measure.guess_max_frames([run(64, 10 * gib)]) is None  # one point: no slope
  # the runs of the search's device count only
  four = [run(64, 4 * gib + 64 * gib // 10) | {"devices": 4}, run(256, 4 * gib + 256 * gib // 10) | {"devices": 4}]
  assert step_measure.guess_max_frames(four) is None and step_measure.guess_max_frames(four, devices=4) == 735


def fake_run_config(model, bc, d, f, steps, plan, wall_s=1.0):
  """A step that takes 2 ms per frame (10% more on 2 devices) and runs out of memory above 900 frames."""
  rec = {"devices": d, "frames_per_device": f, "frames_total": d * f, "wall_s": wall_s}
  if f > 900:
    return {**rec, "ok": False, "oom": True, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"}
  ms = 2.0 * f * (1.1 if d > 1 else 1.0)
  fl = 1.5e12 * f
  return {
    **rec,
    "ok": True,
    "ms_per_step": ms,
    "ms_per_frame_step": ms / f,
    "flops_analytic": fl,
    "flops_analytic_executed": fl,
    "flops_xla": 1.02 * fl,
    "lower_s": 1.0,
    "compile_s": 1.0,
    "first_step_s": 0.1,
    "memory": {"peak_bytes": 10**8 * f, "in_use_bytes": 0, "limit_bytes": 80 * 10**9},
    "xla_memory": {"total_bytes": 4 * 10**9 + 10**8 * f},
  }


@pytest.fixture
def fake_bench(monkeypatch):
  """bench_step.main without a model: every (D, F) run is fake_run_config."""
  monkeypatch.setattr(step_measure, "build_host_unet", lambda cfg, seed: (None, 0.0))
  monkeypatch.setattr(step_measure, "param_count", lambda model: 1)
  monkeypatch.setattr(
    step_measure, "matmul_rate", lambda *a: {"size": 8, "iters": 1, "dtype": "bf16", "ms": 1.0, "flops": 8e14}
  )
  monkeypatch.setattr(step_measure, "run_config", fake_run_config)


def test_run_max_frames_and_budget(fake_bench, tmp_path, monkeypatch):
  out = tmp_path / "r.json"
  args = [
    "bench_step",
    "--frames=64,256",
    "--devices=1,2",
    "--find_max_frames",
    "--max_frames_devices=1",
    f"--out={out}",
  ]
  assert bench_step.main(args) == 0
  r = json.loads(out.read_text())
  assert [w["efficiency"] for w in r["weak_scaling"]] == pytest.approx([1 / 1.1, 1 / 1.1])
  assert r["runs"][0]["mfu"] == pytest.approx(1.5e12 * 64 / 0.128 / 8e14)
  mf = r["max_frames"]
  # linear memory 4 GB + 0.1 GB per frame of 80 GB: the guess is 736 frames, probed from 704 upward
  assert mf["guess"] == 736 and mf["probes"][0] == {"frames": 704, "fits": True}
  assert (mf["largest_fit"], mf["smallest_fail"], mf["complete"]) == (896, 960, True)
  assert len(mf["probe_runs"]) == len(mf["probes"]) and mf["devices"] == 1 and "probing" not in mf
  assert all(p["frames_total"] == p["frames_per_device"] for p in mf["probe_runs"])

  # the search on the largest of --devices (F per device; the fake runs out of memory above 900 per device)
  probed, on_record = [], []

  def probe(*a):
    probed.append(a[2:5])
    saved = json.loads(out.read_text())  # the JSON on disk names the run or probe in flight
    on_record.append(saved["max_frames"]["probing"] if a[4] == 0 else saved["running"]["frames_per_device"])
    return fake_run_config(*a)

  monkeypatch.setattr(step_measure, "run_config", probe)
  assert bench_step.main(["bench_step", "--frames=64,256", "--devices=2", "--find_max_frames", f"--out={out}"]) == 0
  mf = json.loads(out.read_text())["max_frames"]
  assert (mf["devices"], mf["largest_fit"], mf["smallest_fail"], mf["complete"]) == (2, 896, 960, True)
  assert probed[:2] == [(2, 64, 5), (2, 256, 5)] and all(p[0] == 2 and p[2] == 0 for p in probed[2:])
  assert on_record == [p[1] for p in probed] and on_record[2:] == [p["frames"] for p in mf["probes"]]
  assert "running" not in json.loads(out.read_text())
  assert "max frames per device on 2 device(s): 896 fits" in step_report.format_table(json.loads(out.read_text()))
  (row,) = results_table.rows_from_json(json.loads(out.read_text()))[results_table.MAX]
  assert row.startswith(f"| {mf_date(out)} | ") and "| 2 | dual | 1792 | 1920 | True |" in row

  # a run as long as the whole budget: the next one is skipped, and no max-frames probe starts
  monkeypatch.setattr(step_measure, "run_config", lambda *a: fake_run_config(*a, wall_s=2000.0))
  assert bench_step.main([*args, "--time_budget_s=1000"]) == 0
  r = json.loads(out.read_text())
  assert [x["ok"] for x in r["runs"]] == [True, False, False, False] and r["runs"][1]["skipped"]
  assert r["weak_scaling"] == [] and r["max_frames"]["probes"] == [] and not r["max_frames"]["complete"]
  assert "skipped" in step_report.format_table(r)


def mf_date(path) -> str:
  return json.loads(path.read_text())["meta"]["date"][:10]


TORCH_OUT = """params 1411.0 M dtype torch.float16 compile False
F=  16 step(CFG)=   131.8 ms  per-frame-step=  8.24 ms  peak=  4.3 GiB
F=  64 step(CFG)=   451.8 ms  per-frame-step=  7.06 ms  peak=  9.1 GiB
"""


def test_torch_baseline_parsing(tmp_path, monkeypatch):
  rows = torch_baseline.parse_torch_output(TORCH_OUT)
  assert rows == [
    {"frames": 16, "ms_per_step": 131.8, "ms_per_frame_step": 8.24, "peak_gib": 4.3},
    {"frames": 64, "ms_per_step": 451.8, "ms_per_frame_step": 7.06, "peak_gib": 9.1},
  ]
  script = tmp_path / "baseline.py"
  script.write_text(f"import sys\nprint({TORCH_OUT!r})\nassert sys.argv[1:] == ['float16', '16,64', 'compile']\n")
  monkeypatch.setattr(torch_baseline, "TORCH_BASELINE", script)
  b = torch_baseline.run_torch_baseline([16, 64], "float16", True, 60)
  assert "error" not in b and b["mode"] == "compile" and b["rows"] == rows
  runs = [{"ok": True, "devices": 1, "frames_per_device": 16, "ms_per_frame_step": 2.06}]
  (r,) = torch_baseline.torch_ratios(runs, [b])
  assert r["frames"] == 16 and r["ratio"] == pytest.approx(8.24 / 2.06)
  # a failing baseline (diffusers missing, say) is an error entry with the end of its output
  script.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
  b = torch_baseline.run_torch_baseline([16], "float16", False, 60)
  assert "exit code 3" in b["error"] and "boom" in b["error"] and b["rows"] == []


def test_flag_errors(monkeypatch, capsys):
  def old_make_denoiser(model, plan, temporal, mesh, *, latent_shape, context_per_frame=False):
    raise AssertionError("not reached")

  monkeypatch.setattr(parallel, "make_denoiser", old_make_denoiser)
  assert bench_step.main(["bench_step", "--frame_chunk=4", "--frames=16,x"]) == 2
  err = capsys.readouterr().err
  assert "no frame_chunk argument" in err and "--frames=16,x" in err
  assert bench_step.main(["bench_step", "--preset=tiny", "--height=100"]) == 2


def test_option_parsers():
  """bench_step's --window_tuning and bench_video's --runs entries: values and the messages of bad ones."""
  from benchmarks import options

  assert options.parse_window_tuning("merged=8:4, blocked=1:2") == {"merged": (8, 4), "blocked": (1, 2)}
  assert options.parse_window_tuning("") == {}
  for bad, msg in (("fused=1:2", "expected merged=N:W"), ("blocked=3:4", "N in 1, 2, 4, 8"), ("merged=8", "N:W")):
    with pytest.raises(ValueError, match=msg):
      options.parse_window_tuning(bad)
  assert options.parse_run("dpmpp_sde:10:chunk=64:kernel=on") == (
    "dpmpp_sde",
    10,
    {"sequential": False, "chunk": 64, "kernel": "on"},
  )
  assert options.parse_run("turbo:4:sequential")[2]["sequential"]
  with pytest.raises(ValueError, match="option 'kernel=auto', expected sequential, chunk=N or kernel=on"):
    options.parse_run("turbo:4:kernel=auto")
  with pytest.raises(ValueError, match="steps 'x', expected a whole number"):
    options.parse_run("turbo:x")


def test_results_table(smoke, tmp_path, monkeypatch, capsys):
  assert "| NVIDIA H" in results_table.render()  # the committed record renders
  # the committed file with its rows taken out: the template a first figure goes into
  empty, sep = [], False
  for line in results_table.RESULTS_MD.read_text().splitlines():
    if sep and line.startswith("|"):
      continue
    sep = line.startswith("|---")
    empty.append(line)
  (tmp_path / "empty.md").write_text("\n".join(empty) + "\n")
  assert "No GPU figures" in results_table.render(tmp_path / "empty.md")
  # rows made from a bench_step JSON go back into RESULTS.md and render
  fake = json.loads(json.dumps(smoke))
  fake["meta"]["device_kind"] = "NVIDIA H100 80GB HBM3"
  fake["max_frames"] = {"largest_fit": 896, "smallest_fail": 960, "complete": True}
  ours = next(r["ms_per_frame_step"] for r in fake["runs"] if r["devices"] == 1)
  fake["torch_baseline"] = [{"mode": "eager", "rows": [{"frames": F, "ms_per_frame_step": 2.5 * ours}]}]
  rows = results_table.rows_from_json(fake)
  assert len(rows[results_table.STEP]) == 2 and len(rows[results_table.WEAK]) == 1 and len(rows[results_table.MAX]) == 1
  # files of one call: a baseline-only file (another GPU of the machine) and a D=2 file
  side = {"meta": {"command": "python -m benchmarks.bench_step --devices="}, "runs": []}
  side["torch_baseline"] = [{"mode": "compile", "rows": [{"frames": F, "ms_per_frame_step": 1.5 * ours}]}]
  two = json.loads(json.dumps(fake))
  two["meta"]["command"] += " --devices=2"
  two["runs"] = [r for r in two["runs"] if r["devices"] == 2]
  one = json.loads(json.dumps(fake))
  one["runs"] = [r for r in one["runs"] if r["devices"] == 1]
  base = results_table.torch_baselines([one, side, two])
  assert "eager 2.50x, compile* 1.50x" in results_table.rows_from_json(one, base)[results_table.STEP][0]
  assert results_table.rows_from_json(side, base) == {
    results_table.STEP: [],
    results_table.WEAK: [],
    results_table.MAX: [],
  }
  (across,) = results_table.weak_scaling_across([one, side, two])
  t1, t2 = one["runs"][0]["ms_per_step"], two["runs"][0]["ms_per_step"]
  assert f"| {t1:.1f} | {t2:.1f} | {t1 / t2:.1%} |" in across and "--devices=2" in across
  text = (tmp_path / "empty.md").read_text()
  for section, lines in rows.items():
    head = f"## {section}"
    sep = "|---" * len(results_table.COLUMNS[section]) + "|"
    at = text.index(sep, text.index(head)) + len(sep)
    text = text[:at] + "\n" + "\n".join(lines) + text[at:]
  results = tmp_path / "RESULTS.md"
  results.write_text(text)
  block = results_table.render(results)
  assert "NVIDIA H100 80GB HBM3" in block and "eager 2.50x" in block and "896" in block and "Weak scaling" in block

  readme = tmp_path / "README.md"
  readme.write_text(f"# x\n\n{results_table.BEGIN}\nold\n{results_table.END}\n\nrest\n")
  assert results_table.check(readme, results)  # differs
  assert results_table.main(["--check", str(readme), "--results", str(results)]) == 1
  results_table.write(readme, results)
  assert results_table.check(readme, results) == [] and readme.read_text().endswith("\n\nrest\n")
  assert results_table.main(["--check", str(readme), "--results", str(results)]) == 0
  readme.write_text("# no markers\n")
  assert results_table.main(["--check", str(readme)]) == 1
  monkeypatch.setattr(sys, "argv", ["results_table"])
  assert results_table.main([]) == 0
  # --rows of one call's files: a bench_step JSON (it has "meta" and "runs") and a bench_video JSON of several runs
  step_json = tmp_path / "step.json"
  step_json.write_text(json.dumps(fake))
  video_json = results_table.RESULTS_MD.parent / "results" / "2026-12-07" / "1_video_stream_h100" / "video_stream.json"
  capsys.readouterr()
  assert results_table.main(["--rows", str(step_json), str(video_json)]) == 0
  printed = capsys.readouterr().out
  assert f"## {results_table.STEP}  ({step_json})" in printed and f"## {results_table.VIDEO}  ({video_json})" in printed
  assert printed.count("| 2026-12-07 | NVIDIA H100 80GB HBM3 | 1 | 1152 |") == 4


def test_trace_summary(tmp_path):
  """Kernel time by kind, busy time and exposed communication from a GPU-shaped perfetto trace."""
  import gzip

  from benchmarks import trace_summary

  def meta(pid, name, tid=None):
    e = {"ph": "M", "pid": pid, "name": "thread_name" if tid else "process_name", "args": {"name": name}}
    return e | ({"tid": tid} if tid else {})

  def kern(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}

  events = [
    meta(1, "/host:CPU"),
    meta(7, "/device:GPU:0"),
    meta(7, "Stream #13(compute)", tid=13),
    meta(7, "Stream #14(nccl)", tid=14),
    meta(7, "XLA Ops", tid=2),
    kern(1, 5, "PjitFunction(step)", 0, 1000),  # host: not counted
    kern(7, 2, "fusion.1", 0, 400),  # a derived line: not counted
    kern(7, 13, "sm90_xmma_gemm_bf16bf16_bf16f32", 0, 100),
    kern(7, 13, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 100, 50),
    kern(7, 13, "loop_add_fusion", 150, 30),
    kern(7, 14, "ncclDevKernel_SendRecv", 120, 100),  # 70 us under compute, 40 us alone... up to 220
    kern(7, 13, "input_reduce_fusion", 240, 20),
  ]
  p = tmp_path / "plugins" / "profile" / "x" / "perfetto_trace.json.gz"
  p.parent.mkdir(parents=True)
  with gzip.open(p, "wt") as f:
    json.dump({"traceEvents": events}, f)
  s = trace_summary.summarize(trace_summary.load_events(tmp_path), steps=2)
  assert list(s) == ["/device:GPU:0"]
  g = s["/device:GPU:0"]
  ms = 1e-3 / 2
  assert g["by_kind_ms"] == pytest.approx(
    {"matmul": 100 * ms, "attention": 50 * ms, "other": 30 * ms, "comm": 100 * ms, "reduce": 20 * ms}
  )
  assert g["kernels"] == 2.5
  assert g["kernel_ms"] == pytest.approx(300 * ms)
  assert g["busy_ms"] == pytest.approx(240 * ms)  # [0, 220] and [240, 260]
  assert g["span_ms"] == pytest.approx(260 * ms)
  assert g["comm_ms"] == pytest.approx(100 * ms)
  assert g["comm_exposed_ms"] == pytest.approx(40 * ms)  # [180, 220]: nothing else ran
  assert g["top"][0]["name"].startswith("sm90_xmma_gemm") and g["top"][0]["count"] == 0.5
  assert "exposed 0.0" in trace_summary.format_summary(s)
  assert trace_summary.main([str(p), "--steps", "2", "--json", str(tmp_path / "s.json")]) == 0
  assert json.loads((tmp_path / "s.json").read_text())["/device:GPU:0"]["busy_ms"] == pytest.approx(240 * ms)


def test_attention_check_logic():
  """The GPU check's arithmetic on CPU, with XLA standing in for cuDNN: identical paths agree exactly, and
  bf16 attention lands within the check's bound of the float32 result (four query blocks, masked ends)."""
  from benchmarks import attention_check

  r = attention_check.check(256, 4, 2, "dual", "mask", 300.0, seed=0, fast="xla")
  assert r["ok"] and r["finite"] and r["err_cudnn_vs_xla"] == 0.0
  assert 0 < r["err_cudnn_vs_f32"] <= attention_check.BF16_TOL and r["ms_cudnn"] > 0
  assert attention_check.main([]) == 0  # CPU: nothing to check, says so


def test_step_compiler_options(monkeypatch):
  """The step compiles as the sampler does (parallel.compiler_options) unless told otherwise."""
  monkeypatch.setattr(parallel, "compiler_options", lambda num_devices=1: {"xla_gpu_enable_triton_gemm": False})
  fv = bench_step.FV
  fv.unparse_flags()
  fv(["bench_step", "--compiler_options=xla_gpu_autotune_level=0"])
  try:
    bc = bench_step.config_from_flags(fv)
    assert step_measure.step_compiler_options(bc) == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}
    monkeypatch.undo()
    # the real options: none on CPU; on GPU cuBLAS GEMMs, and the latency-hiding scheduler on several devices
    assert parallel.compiler_options(1) is None and parallel.compiler_options(4) is None
    fv.unparse_flags()
    fv(["bench_step", "--compiler_options=xla_gpu_enable_triton_gemm=true", "--nopipeline_compiler_options"])
    bc = bench_step.config_from_flags(fv)
    assert step_measure.step_compiler_options(bc) == {"xla_gpu_enable_triton_gemm": True}
  finally:
    fv.unparse_flags()


def test_kernel_probe_cpu_smoke(tmp_path):
  """Every case of the probe runs (no error rows) and reports a time and a bandwidth."""
  from benchmarks import kernel_probe

  out = tmp_path / "probe.json"
  kernel_probe.main(["--reps", "1", "--only", "copy,gn,geglu", "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert len(rows) > 20 and not [r for r in rows if "error" in r]
  assert all(r["ms"] > 0 and r["GB_per_s"] > 0 for r in rows)
  assert any(r["case"].startswith("geglu L0 pallas") for r in rows)


def test_step_check_compare(tmp_path):
  """The comparison passes within the bf16 bound and fails past it, each bf16 version also against float32."""
  from benchmarks import step_check

  rng = np.random.default_rng(0)
  ref = {f"t{t}": rng.standard_normal((2, 4, 3)) for t in step_check.TIMESTEPS}
  close = {k: v + 2e-3 * rng.standard_normal(v.shape) for k, v in ref.items()}
  far = {k: v + 0.2 for k, v in ref.items()}
  np.savez(
    tmp_path / "new.npz", **{f"bf16_{k}": v for k, v in close.items()}, **{f"f32_{k}": v for k, v in ref.items()}
  )
  np.savez(tmp_path / "old.npz", **{f"bf16_{k}": v for k, v in ref.items()})
  np.savez(tmp_path / "bad.npz", **{f"bf16_{k}": v for k, v in far.items()})
  assert (
    step_check.main(
      ["--compare", str(tmp_path / "new.npz"), str(tmp_path / "old.npz"), "--json", str(tmp_path / "c.json")]
    )
    == 0
  )
  rows = json.loads((tmp_path / "c.json").read_text())["rows"]
  assert [r["t"] for r in rows] == list(step_check.TIMESTEPS) and all(0 < r["new_vs_f32"] <= 1e-2 for r in rows)
  assert step_check.main(["--compare", str(tmp_path / "bad.npz"), str(tmp_path / "old.npz")]) == 1
