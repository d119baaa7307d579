"""``make bench``: performance of Vitrine at one million items (docs/benchmarks.md)."""

import os

# OpenMP threads that spin while waiting made FAISS training 2-4x slower on a shared
# 2-core machine; passive waiting costs nothing measurable when the machine is idle.
# Set before FAISS / LightGBM load the OpenMP runtime; the services started by the
# benchmark inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
