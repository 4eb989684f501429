"""Peak host memory of the converter on a full-size synthetic checkpoint (CPU; no GPU needed).

  python benchmarks/convert_peak_memory.py /tmp/vc2_synthetic   # writes model.ckpt there, converts, reports

The checkpoint holds random tensors with every key and shape of the real one
(``shared/reference/videocrafter2_state_dict.json``, 2039 tensors, float32: about 7.4 GB), in the
``{'state_dict': ...}`` layout, saved by torch; the schedule buffers are the real values.
"""

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from convert.manifests import MANIFESTS
from vinf_jax import sampling

MANIFEST = MANIFESTS / "videocrafter2_state_dict.json"


def main(workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  ckpt = os.path.join(workdir, "model.ckpt")
  if not os.path.exists(ckpt):
    shapes = json.loads(MANIFEST.read_text())["tensors"]
    sched = sampling.schedule()
    g = torch.Generator().manual_seed(0)
    sd = {
      k: (torch.from_numpy(np.asarray(sched[k], np.float32)) if k in sched else torch.randn(v, generator=g) * 0.02)
      for k, v in shapes.items()
    }
    torch.save({"state_dict": sd}, ckpt)
    del sd
  out = os.path.join(workdir, "converted")
  t0 = time.time()
  r = subprocess.run(
    [sys.executable, "-m", "convert.videocrafter2", f"--ckpt={ckpt}", f"--out={out}"],
    cwd=pathlib.Path(__file__).resolve().parents[1],
  )
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
  print(f"exit {r.returncode}; converter wall {time.time() - t0:.0f} s; peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
  main(sys.argv[1])
