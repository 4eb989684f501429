"""Key/shape manifests of the published checkpoints, carried with the converter (no weights needed).

``videocrafter2_state_dict.json``: every key and shape of VideoCrafter2's ``model.ckpt`` (2,039 tensors, in
the checkpoint's order; how it was obtained is its ``source`` field). ``python -m convert.videocrafter2
--check_manifest=videocrafter2`` maps it onto the full-size model; the tests read it to check the layouts.
"""

import pathlib

MANIFESTS = pathlib.Path(__file__).resolve().parent
BUNDLED = {"videocrafter2": MANIFESTS / "videocrafter2_state_dict.json"}


def resolve(name_or_path: str) -> str:
  """A bundled manifest's path for its name (``videocrafter2``), else ``name_or_path`` itself."""
  return str(BUNDLED.get(name_or_path, name_or_path))
