"""Tests for avae_jax.visualize: exact grid layout, figure order, latent helpers."""

import warnings

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from avae_jax import visualize


def constant_images(values, h=2, w=2, c=1):
  """Images where image k is filled with values[k] (floats in [0, 1])."""
  return np.stack([np.full((h, w, c), v, np.float32) for v in values])


def cell(grid, row, col, h, w, pad=1):
  """The (h, w) tile at (row, col) of a grid with `pad` borders."""
  top, left = pad + row * (h + pad), pad + col * (w + pad)
  return grid[top:top + h, left:left + w]


def test_grid_exact_pixels():
  # Three 2x2 grayscale images, values 1/255, 2/255, 3/255 -> uint8 1, 2, 3.
  images = constant_images([1 / 255, 2 / 255, 3 / 255])
  out = visualize.grid(images, ncol=2, pad=1, pad_value=0.0)
  expected = np.array([
      [0, 0, 0, 0, 0, 0, 0],
      [0, 1, 1, 0, 2, 2, 0],
      [0, 1, 1, 0, 2, 2, 0],
      [0, 0, 0, 0, 0, 0, 0],
      [0, 3, 3, 0, 0, 0, 0],
      [0, 3, 3, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0],
  ], np.uint8)[..., None]
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)


def test_grid_rgb_padding_and_values():
  rng = np.random.default_rng(0)
  images = rng.random((5, 3, 4, 3)).astype(np.float32)
  out = visualize.grid(images, ncol=3, pad=2, pad_value=1.0)
  assert out.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2, 3)
  for k in range(5):
    np.testing.assert_array_equal(cell(out, k // 3, k % 3, 3, 4, pad=2),
                                  np.round(images[k] * 255).astype(np.uint8))
  # Borders and the empty sixth cell are white.
  mask = np.ones(out.shape[:2], bool)
  for k in range(5):
    top, left = 2 + (k // 3) * 5, 2 + (k % 3) * 6
    mask[top:top + 3, left:left + 4] = False
  assert (out[mask] == 255).all()
  with pytest.raises(ValueError):
    visualize.grid(images[..., :2], ncol=3)


def test_reconstructions_ground_truth_on_top():
  x = constant_images([k / 255 for k in range(10, 15)])        # 10..14
  x_rec = constant_images([k / 255 for k in range(20, 25)])    # 20..24
  out = visualize.reconstructions(x, x_rec, n=5, ncol=3, pad_value=0.0)
  expected_rows = [[10, 11, 12], [20, 21, 22], [13, 14, 0], [23, 24, 0]]
  assert out.shape == (4 * 3 + 1, 3 * 3 + 1, 1)
  for r, row in enumerate(expected_rows):
    for c, value in enumerate(row):
      assert (cell(out, r, c, 2, 2) == value).all(), (r, c)
  # Default: one pair of rows with the first n images.
  single = visualize.reconstructions(x, x_rec, n=4)
  assert single.shape == (2 * 3 + 1, 4 * 3 + 1, 1)
  assert (cell(single, 0, 3, 2, 2) == 13).all() and (cell(single, 1, 3, 2, 2) == 23).all()
  # uint8 images (0..255) give the same figure as their floats in [0, 1].
  as_uint8 = visualize.reconstructions(np.round(x * 255).astype(np.uint8),
                                       np.round(x_rec * 255).astype(np.uint8), n=5, ncol=3,
                                       pad_value=0.0)
  np.testing.assert_array_equal(as_uint8, out)


def test_interpolation_and_traversal_rows():
  rows = np.stack([constant_images([(10 * p + s) / 255 for s in range(4)])
                   for p in range(3)])  # (3, 4, 2, 2, 1)
  for figure in (visualize.interpolations(rows), visualize.traversals(rows)):
    assert figure.shape == (3 * 3 + 1, 4 * 3 + 1, 1)
    for p in range(3):
      for s in range(4):
        assert (cell(figure, p, s, 2, 2) == 10 * p + s).all()
  samples = visualize.samples(rows[0], ncol=2)
  assert samples.shape == (2 * 3 + 1, 2 * 3 + 1, 1)


def test_save_png_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  path = tmp_path / 'figs' / 'a.png'
  visualize.save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  gray = visualize.grid(constant_images([0.5]), ncol=1)
  visualize.save_png(tmp_path / 'g.png', gray)
  assert np.asarray(Image.open(tmp_path / 'g.png')).shape == (4, 4)


@pytest.mark.parametrize('dtype', [np.int32, np.uint16, np.int64, bool])
def test_integer_images_other_than_uint8_are_refused(dtype, tmp_path):
  # 128 as int32 is no float in [0, 1]: it used to come out as a white cell.
  images = np.full((2, 2, 2, 1), 128 if dtype is not bool else True, dtype)
  rows = images[None]
  calls = [lambda: visualize.grid(images, ncol=2),
           lambda: visualize.samples(images, ncol=2),
           lambda: visualize.reconstructions(images, images, n=2),
           lambda: visualize.reconstructions(constant_images([0.5, 0.5]), images, n=2),
           lambda: visualize.interpolations(rows),
           lambda: visualize.traversals(rows),
           lambda: visualize.save_png(tmp_path / 'a.png', images[0])]
  for call in calls:
    with pytest.raises(ValueError, match='uint8 .*or floats'):
      call()
  assert not (tmp_path / 'a.png').exists()


@pytest.mark.parametrize('value, pattern', [(128.0, r'\[0, 128\] \(divide by 255\?\)'),
                                            (-0.5, r'\[-0\.5, 0\.5\] \(clip')])
def test_float_images_outside_the_unit_range_are_refused_and_nans_drawn_black(
    value, pattern, tmp_path):
  # Floats on the 0..255 scale came out as an all-white figure, without an error.
  images = constant_images([0.5, value, 0.0, 0.25])
  rows = images.reshape(2, 2, 2, 2, 1)
  calls = [lambda: visualize.grid(images, ncol=2),
           lambda: visualize.samples(images, ncol=2),
           lambda: visualize.reconstructions(images, constant_images([0.5] * 4), n=2),
           lambda: visualize.reconstructions(constant_images([0.5] * 4), images, n=2),
           lambda: visualize.interpolations(rows),
           lambda: visualize.traversals(rows),
           lambda: visualize.save_png(tmp_path / 'a.png', images.reshape(8, 2, 1))]
  for call in calls:
    with pytest.raises(ValueError, match=pattern):
      call()
  assert not (tmp_path / 'a.png').exists()
  # A diverged model's NaN pixels: drawn black (0), the rest as usual.
  g = visualize.grid(constant_images([np.nan, 1.0]), ncol=2, pad=0)
  assert g[:, :2].tolist() == [[[0], [0]], [[0], [0]]] and (g[:, 2:] == 255).all()
  # bfloat16 too, without numpy's warning of the NaN in its reduction.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    g16 = visualize.grid(constant_images([np.nan, 1.0]).astype(ml_dtypes.bfloat16), ncol=2,
                         pad=0)
  np.testing.assert_array_equal(g16, g)


def test_reconstructions_bad_counts_are_clear_errors():
  x = constant_images([0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match='ncol >= 1'):
    visualize.reconstructions(x, x, n=3, ncol=0)
  with pytest.raises(ValueError, match='n >= 0'):
    visualize.reconstructions(x, x, n=-1)
  # Counts that are not integers: one line each, not numpy's or range's TypeError.
  for call in (lambda: visualize.reconstructions(x, x, n=2.5),
               lambda: visualize.reconstructions(x, x, n=2, ncol=1.5),
               lambda: visualize.grid(x, ncol=2.5), lambda: visualize.grid(x, ncol=True),
               lambda: visualize.grid(x, ncol=2, pad=0.5)):
    with pytest.raises(ValueError, match='must be an integer'):
      call()
  # Rows of no images (a traversal with no values): one blank cell, where no rows of 3
  # give one blank row of 3 cells; it was an error about an ncol the caller never gave.
  for shape, side in (((3, 0, 2, 2, 1), 1), ((0, 3, 2, 2, 1), 3)):
    for figure in (visualize.interpolations, visualize.traversals):
      np.testing.assert_array_equal(figure(np.zeros(shape, np.float32), pad_value=0.0),
                                    np.zeros((4, 3 * side + 1, 1), np.uint8))
  # No images at all: one blank pair of cells (pad_value), not a ZeroDivisionError.
  empty = np.zeros((0, 2, 2, 1), np.float32)
  out = visualize.reconstructions(empty, empty, n=4, pad_value=0.0)
  np.testing.assert_array_equal(out, np.zeros((2 * 3 + 1, 1 * 3 + 1, 1), np.uint8))
  out = visualize.reconstructions(x, x, n=0, pad_value=1.0)
  np.testing.assert_array_equal(out, np.full((2 * 3 + 1, 1 * 3 + 1, 1), 255, np.uint8))
  # Fewer reconstructions than inputs: the pairs there are, 2 of them in a row of 2 cells
  # of 2x2 pixels (pad 1): 2 * 3 + 1 = 7 pixels each way.
  x = np.full((3, 2, 2, 1), 0.5, np.float32)
  x_rec = np.full((2, 2, 2, 1), 0.2, np.float32)
  out = visualize.reconstructions(x, x_rec, n=3)
  assert out.shape == (7, 7, 1)
  assert out[1, 1, 0] == 128 and out[4, 1, 0] == 51  # round(0.5 * 255), round(0.2 * 255)


def test_traversal_axes_refuse_a_negative_dim():
  # -1 would index the last latent dimension from the end, not a dimension asked for.
  with pytest.raises(ValueError, match=r'dims \[-1\] out of range for latent_dim 4'):
    visualize.traversal_axes([-1], [0.0], 4)
  dims, values = visualize.traversal_axes([0, 3], [0.5], 4)  # both ends of the range
  assert dims.tolist() == [0, 3] and values.tolist() == [0.5]
  # One past the end: JAX drops an out-of-range update, so its row would not change.
  with pytest.raises(ValueError, match=r'dims \[4\] out of range for latent_dim 4'):
    visualize.traversal_axes([4], [0.0], 4)
  # Values that are not finite in float32 (inf, or past its range) decode to NaN images.
  for value in (np.inf, 1e39):
    with pytest.raises(ValueError, match='values must be finite float32 numbers'):
      visualize.traversal_axes([0], [value], 4)


def test_figures_refuse_bad_shapes_and_sizes_with_their_own_message():
  x = constant_images([0.1, 0.2])
  for images in (np.zeros((1, 2, 2, 4), np.float32), np.zeros((1, 1, 2, 2, 1), np.float32)):
    with pytest.raises(ValueError, match=r'images must have 4 axes ending in 1 or 3 channels'):
      visualize.grid(images, 1)
  for ncol, pad in ((0, 1), (2, -1)):
    with pytest.raises(ValueError, match=rf'Need ncol >= 1 and pad >= 0; got {ncol}, {pad}'):
      visualize.grid(x, ncol, pad=pad)
  # Gray reconstructions beside RGB inputs are no pairs of one image.
  with pytest.raises(ValueError, match='differ in image shape'):
    visualize.reconstructions(constant_images([0.1], c=3), x, n=1)
  # The border of samples takes pad_value, as every figure's does.
  assert visualize.samples(x, 2, pad_value=0.0)[0, 0, 0] == 0


def test_traversal_axes_take_scalars_as_lists_of_one_and_refuse_booleans():
  dims, values = visualize.traversal_axes(1, 0.5, 4)
  assert dims.shape == (1,) and values.shape == (1,)
  assert (dims.tolist(), values.tolist()) == ([1], [0.5])
  with pytest.raises(ValueError, match='values must be a list of numbers'):
    visualize.traversal_axes([0], [True, False], 4)
  # A value past float32's range is refused without numpy's overflow warning first.
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    with pytest.raises(ValueError, match='values must be finite float32 numbers'):
      visualize.traversal_axes([0], [1e39], 4)


def test_integer_accepts_its_minimum():
  assert visualize.integer(2, 'steps', 2) == 2
  assert visualize.integer(0, 'n', 0) == 0
  with pytest.raises(ValueError, match='steps must be an integer >= 2, got 1'):
    visualize.integer(1, 'steps', 2)
