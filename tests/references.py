"""Reference computations shared by several test files, written out from the papers."""

import numpy as np


def paper_mss_weights(m: int, n: int) -> np.ndarray:
  """Minibatch stratified sampling weights: stratum sizes / N written out entry by entry.

  Chen et al. (2018), App. C.2: sample i's own data point, the stratum that lost it (the
  next row's, as in their code) and the M - 2 full strata of N / (M - 1) points.
  """
  k = m - 1
  w = np.empty((m, m))
  for i in range(m):
    for j in range(m):
      if j == i:
        size = 1.0              # the sample's own data point
      elif j == (i + 1) % m:
        size = n / k - 1.0      # the stratum that lost the sample's own point
      else:
        size = n / k            # a full stratum
      w[i, j] = size / n
  return w
