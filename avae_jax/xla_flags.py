"""XLA:CPU flags that the project's programs set before JAX creates its backends.

jaxlib 0.10 runs each convolution on the CPU through YNNPACK by default. For the models'
convolutions XLA's own kernels are faster: with YNNPACK's convolutions switched off, the
CelebA-shaped pre-training step took 3.99 s instead of 4.57 s and the adversarial step
8.44 s instead of 11.17 s (docs/benchmarks.md, item 7). YNNPACK still computes matrix
products and reductions (switching those off too was not faster for the MNIST-shaped
steps).

`apply()` adds the flags to XLA_FLAGS; train.py, eval.py, study.py, benchmark.py and the
tests call it first thing. A flag that XLA_FLAGS already sets keeps the user's value. The
flags are only added for the jaxlib versions they were measured with: an XLA that does
not know a flag refuses to start.
"""

from __future__ import annotations

import importlib.metadata
import os

# name -> value; each was measured on the CPU with the jaxlib series in JAXLIB_SERIES.
CPU_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'}
JAXLIB_SERIES = ('0.10.',)


def _jaxlib_version() -> str:
  """The installed jaxlib's version ('' when it is not installed)."""
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def with_cpu_flags(xla_flags: str, jaxlib_version: str | None = None) -> str:
  """`xla_flags` plus each of CPU_FLAGS that it does not set already."""
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  if not version.startswith(JAXLIB_SERIES):
    return xla_flags
  words = xla_flags.split()
  given = {w.lstrip('-').split('=', 1)[0] for w in words}
  words += [f'--{name}={value}' for name, value in CPU_FLAGS.items() if name not in given]
  return ' '.join(words)


def apply() -> None:
  """Adds CPU_FLAGS to os.environ['XLA_FLAGS']; effective before JAX's first computation."""
  flags = with_cpu_flags(os.environ.get('XLA_FLAGS', ''))
  if flags:
    os.environ['XLA_FLAGS'] = flags
