"""Comparing pytrees in the tests: the same structure and bit-identical leaves."""

from typing import Any

import jax
import numpy as np


def assert_trees_equal(actual: Any, expected: Any) -> None:
  """Same structure, each leaf of the same dtype and shape and equal; names a leaf that differs."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(expected)):
    x, y = np.asarray(x), np.asarray(y)
    name = jax.tree_util.keystr(path)
    assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, x.shape, y.dtype, y.shape)
    assert np.array_equal(x, y), f'{name} differs'
