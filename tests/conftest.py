"""Test session setup (before jax initialises): 8 fake CPU devices for the clip-parallel tests, and one
persistent compilation cache for the whole run.

Many tests compile the same programs: the tiny model's step and decoder under the demo settings, in this
process and in the command-line, multi-process and notebook subprocesses they start (which inherit the
environment), and the model builds' many small eager programs. JAX's persistent cache lets each program
compile once per run; a cache hit runs the same compiled program, so no result changes. The folder is new
for every run (nothing carries over between runs) and removed at the end. Tests of the cache itself use
their own folders (``pipeline.use_compilation_cache`` reopens the cache there).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="vinf_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  # every program, the model builds' small eager ones too (a subprocess compiles them again otherwise)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# The slow tier: `python -m pytest -q -m "not slow" tests` leaves these out (CI and the README's test command
# run everything). Whole runs of the sampler (several steps, compiles of their own), other processes, the
# browser and the notebook; every module keeps fast tests of its own. file::test (all its parameters).
SLOW = {
  # other processes (jax.distributed on localhost, the command line, the notebook kernel, the browser)
  "test_parallel.py::test_multi_host_equals_one_process",
  "test_sample.py::test_cli_two_processes_equal_one",
  "test_app.py::test_two_processes_follow_process_0",
  "test_app_browser.py::test_page_in_a_browser",
  "test_colab.py::test_notebook_runs_tiny_on_cpu",
  "test_sample.py::test_demo_flagfile_end_to_end",
  "test_faults.py::test_full_disk_through_the_command_line",
  "test_faults.py::test_official_single_gpu_example_runs",
  "test_convert.py::test_cli_help_and_a_quiet_conversion",
  "test_memory.py::test_an_out_of_memory_in_the_command_exits_1_in_one_line",
  "test_benchmarks.py::test_bench_step_smoke",
  # whole sampling loops and their equalities (1 vs 4 devices, resume, multi-prompt, compile cache)
  "test_parallel.py::test_device_count_invariance",
  "test_window_kernel.py::test_window_kernel_in_the_whole_model",
  "test_window_kernel.py::test_window_kernel_in_bfloat16_adds_no_error",
  "test_sample.py::test_multi_prompt_with_and_without_transition",
  "test_sample.py::test_latents_same_on_one_and_four_devices",
  "test_sample.py::test_compile_only_fills_the_cache_and_writes_nothing",
  "test_sample.py::test_resume_equals_uninterrupted",
  "test_turbo.py::test_turbo_latents_same_on_one_and_four_devices",
  "test_turbo.py::test_plain_unet_unchanged_and_v2_combination",
  "test_frame_chunk.py::test_chunked_denoiser_on_four_devices",
  "test_diffusers_t2v.py::test_whole_pipeline_run",
  "test_diffusers_t2v.py::test_dual_scope_on_one_and_four_devices",
  "test_app.py::test_request_makes_the_video_then_reuses_the_programs",
  # whole runs with a stop, a resume or a cut prompt (the fast tier keeps the other phases and checks of each)
  "test_signals.py::test_a_stop_while_sampling_saves_the_state_and_the_command_continues",
  "test_signals.py::test_leftovers_go_and_a_copied_run_json_passes_no_latents_off",
  "test_sample.py::test_long_prompts_are_cut_with_one_warning",
  "test_faults.py::test_full_state_dir_warns_in_one_line_per_save",
  "test_turbo.py::test_turbo_resume_equals_uninterrupted",
  "test_benchmarks.py::test_results_table",  # its fixture is the slow bench_step smoke run
  # large compiles: the fast tier keeps one of each kind
  "test_convert.py::test_three_layouts_convert_and_restore_to_the_same_outputs",
  "test_models.py::test_abstract_model_is_the_models_graph",
  "test_memory.py::test_plan_matches_xla_on_a_point_it_was_not_fitted_on",
  "test_turbo.py::test_turbo_unet_matches_diffusers_time_cond_proj",
  "test_turbo.py::test_converter_turbo_layouts",
}
SLOW_PARAMS = {  # parametrised tests of which the fast tier keeps the other cases
  "test_unet.py::test_parity_with_diffusers": ("8-1-diffusers", "3-500-diffusers", "1-981-diffusers"),
  "test_frame_chunk.py::test_chunked_unet_equals_unchunked": ("False-2", "True-4"),
}


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: left out of the fast tier (-m 'not slow'); see tests/conftest.py")


def pytest_collection_modifyitems(config, items):
  import pytest

  for item in items:
    name = f"{item.path.name}::{item.originalname}"
    param = item.callspec.id if hasattr(item, "callspec") else None
    if name in SLOW or (param is not None and param in SLOW_PARAMS.get(name, ())):
      item.add_marker(pytest.mark.slow)
