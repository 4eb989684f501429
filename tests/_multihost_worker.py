"""One process of the multi-host test: ``python -m tests._multihost_worker NPROC PID PORT LOCAL_DEVICES OUT``."""

import os
import sys


def main():
  nproc, pid, port, local, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if nproc > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
  import numpy as np

  from tests.test_parallel import run_video, tame
  from vinf_jax.config import TINY, TemporalConfig
  from vinf_jax.models import unet3d

  model = tame(unet3d.build(TINY.unet, seed=0))
  temporal = TemporalConfig(attention="dual", window=4, num_global=8)
  x = run_video(model, "dpmpp_sde", None, temporal)
  if jax.process_index() == 0:
    np.save(out, x)
  print(f"process {pid}: {jax.device_count()} devices, {jax.local_device_count()} local, latents {x.shape}")


if __name__ == "__main__":
  main()
