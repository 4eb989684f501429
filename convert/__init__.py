"""Weight conversion from PyTorch checkpoints (needs torch: ``pip install -e '.[convert]'``)."""
