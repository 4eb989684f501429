# Sourced by the call scripts: environment, wheels (.whl, carried with the call), results folder.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .whl/site.tar.xz ]; then  # benchmarks/gpu/app_bundle.sh: unpacked packages, not wheels
  mkdir -p /tmp/bundle && tar -xJf .whl/site.tar.xz -C /tmp/bundle \
    && export PYTHONPATH=/tmp/bundle/site${PYTHONPATH:+:$PYTHONPATH}
fi
