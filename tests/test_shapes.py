"""Tests of the procedural shapes dataset: determinism, factor coverage, and geometry
checked against hand-derived moments, areas and colours."""

import numpy as np
import pytest

from avae_jax import data
from avae_jax import shapes
from configs import default

SIZE = 32
# Expected colours written out independently of shapes.COLOURS.
EXPECTED_RGB = {'white': (1, 1, 1), 'red': (1, 0, 0), 'green': (0, 1, 0), 'blue': (0, 0, 1),
                'yellow': (1, 1, 0), 'cyan': (0, 1, 1)}


def _moments(cov):
  """Total mass, centroid (x, y) in pixel-index units and 2x2 covariance of one image."""
  rows, cols = np.meshgrid(np.arange(cov.shape[0]), np.arange(cov.shape[1]), indexing='ij')
  mass = cov.sum()
  mx, my = (cov * cols).sum() / mass, (cov * rows).sum() / mass
  cxx = (cov * (cols - mx) ** 2).sum() / mass
  cyy = (cov * (rows - my) ** 2).sum() / mass
  cxy = (cov * (cols - mx) * (rows - my)).sum() / mass
  return mass, mx, my, np.array([[cxx, cxy], [cxy, cyy]])


def _config(**kw):
  c = default.get_config()
  c.shapes.num_train, c.shapes.num_eval = 600, 200
  c.image_size = SIZE
  c.update(kw)
  return c


def test_load_deterministic_and_splits_differ():
  a = data.load(_config(seed=3), 'train')
  b = data.load(_config(seed=3), 'train')
  ev = data.load(_config(seed=3), 'eval')
  other = data.load(_config(seed=4), 'train')
  idx = np.arange(50)
  np.testing.assert_array_equal(a.get(idx), b.get(idx))
  np.testing.assert_array_equal(a.factors, b.factors)
  assert a.num_examples == 600 and ev.num_examples == 200
  assert not np.array_equal(a.factors[:200], ev.factors)
  assert not np.array_equal(a.get(idx), ev.get(idx))
  assert not np.array_equal(a.factors, other.factors)


def test_the_splits_are_the_documented_draws_of_the_seed():
  # sample_factors' docstring, in numpy: the runs of a seed are reproduced by the numbers.
  sizes = (4, 4, 5, 8, 8, 6)
  order = np.random.default_rng(np.random.SeedSequence([7, 2])).permutation(30720)
  others = np.sort(order[25:])
  picks = np.random.default_rng(np.random.SeedSequence([7, 0])).integers(0, len(others), 40)
  for split, flat in (('eval', order[:25]), ('train', others[picks])):
    expected = np.stack(np.unravel_index(flat, sizes), axis=1)
    np.testing.assert_array_equal(shapes.sample_factors(7, split, 40, 25), expected)


def _rows(factors):
  """The factor rows as a set of tuples."""
  return {tuple(f) for f in factors.tolist()}


def test_eval_images_are_distinct_and_never_training_images():
  src_train = data.load(_config(seed=5), 'train')
  src_eval = data.load(_config(seed=5), 'eval')
  assert len(_rows(src_eval.factors)) == 200
  assert not _rows(src_train.factors) & _rows(src_eval.factors)
  # Pixel for pixel too: no eval image appears among the training images.
  train_images = {im.tobytes() for im in src_train.get(np.arange(600))}
  assert not any(im.tobytes() in train_images for im in src_eval.get(np.arange(200)))
  # A training set that covers most of the 30,720 combinations still leaves eval out,
  # and draws every other combination (those in `seen`), each about equally often.
  sizes = (4, 4, 5, 8, 8, 6)
  ev = shapes.sample_factors(1, 'eval', 60000, 4096)
  tr = shapes.sample_factors(1, 'train', 60000, 4096)
  assert len(_rows(ev)) == 4096 and not _rows(tr) & _rows(ev)
  counts = np.bincount(np.ravel_multi_index(tr.T, sizes), minlength=30720)
  held_out = np.zeros(30720, bool)
  held_out[np.ravel_multi_index(ev.T, sizes)] = True
  assert counts[held_out].sum() == 0
  seen = counts[~held_out]
  # 60000 draws over 26,624 combinations: Poisson(2.25) counts, 10.5% of them zero.
  assert 0.08 < np.mean(seen == 0) < 0.13 and seen.var() < 1.2 * seen.mean()
  # Eval's factors: a uniform sample without replacement, every value of every factor.
  for k, n in enumerate(sizes):
    np.testing.assert_array_equal(np.unique(ev[:, k]), np.arange(n))


def test_source_fields_and_range():
  src = data.load(_config(), 'train')
  assert src.image_shape == (SIZE, SIZE, 3)
  assert src.factor_names == ('shape', 'scale', 'rotation', 'x', 'y', 'colour')
  assert src.factors.shape == (600, 6) and np.issubdtype(src.factors.dtype, np.integer)
  x = src.get(np.arange(64))
  assert x.dtype == np.float32 and x.shape == (64, SIZE, SIZE, 3)
  assert x.min() == 0.0 and 0.9 < x.max() <= 1.0
  # The grids index the factors: every factor's values grid is as long as its range.
  values = shapes.factor_values()
  assert [len(v) for v in values] == [4, 4, 5, 8, 8, 6]
  assert [int(src.factors[:, k].max()) + 1 for k in range(6)] == [len(v) for v in values]
  # The values, as the module's docstring gives them: 4 radii 0.55 .. 1.0 of the largest,
  # 5 angles in [0, 90) degrees (every 18, in radians), centres 0.28 .. 0.72 of the side.
  shape, scale, rotation, x_pos, y_pos, colour = values
  np.testing.assert_array_equal(shape, [0, 1, 2, 3])
  np.testing.assert_allclose(scale, [0.55, 0.7, 0.85, 1.0], rtol=1e-6)
  np.testing.assert_allclose(rotation, np.deg2rad([0, 18, 36, 54, 72]), rtol=1e-6)
  for pos in (x_pos, y_pos):
    np.testing.assert_allclose(pos, 0.28 + 0.44 / 7 * np.arange(8), rtol=1e-6)
  np.testing.assert_array_equal(colour, [EXPECTED_RGB[n] for n in
                                         ('white', 'red', 'green', 'blue', 'yellow', 'cyan')])


def test_factors_cover_their_ranges():
  f = shapes.sample_factors(0, 'train', 2000, 100)
  for k, n in enumerate((4, 4, 5, 8, 8, 6)):
    np.testing.assert_array_equal(np.unique(f[:, k]), np.arange(n))


def test_centroid_moves_with_position_factors():
  for shape in range(4):
    fx = np.array([[shape, 3, 0, i, 3, 0] for i in range(8)])
    fy = np.array([[shape, 3, 0, 3, i, 0] for i in range(8)])
    cx = np.array([_moments(c)[1] for c in shapes.coverage(fx, SIZE)])
    cy_fixed = np.array([_moments(c)[2] for c in shapes.coverage(fx, SIZE)])
    cy = np.array([_moments(c)[2] for c in shapes.coverage(fy, SIZE)])
    # Centres 0.28 .. 0.72 of the side in 8 equal steps, in pixels.
    step = 0.44 / 7 * SIZE
    np.testing.assert_allclose(np.diff(cx), step, atol=0.06)
    np.testing.assert_allclose(np.diff(cy), step, atol=0.06)
    np.testing.assert_allclose(cy_fixed, cy_fixed[0], atol=0.05)
    if shape < 3:  # symmetric shapes: the centroid is the centre (index = pos * S - 0.5)
      np.testing.assert_allclose(cx, np.linspace(0.28, 0.72, 8) * SIZE - 0.5, atol=0.05)


def test_scale_grows_area_as_radius_squared():
  radius_px = 0.2 * SIZE  # MAX_RADIUS of the side at scale 1
  scales = np.array([0.55, 0.7, 0.85, 1.0])
  for shape in range(4):
    f = np.array([[shape, s, 0, 4, 4, 0] for s in range(4)])
    area = shapes.coverage(f, SIZE).sum(axis=(1, 2))
    assert np.all(np.diff(area) > 0)
    np.testing.assert_allclose(area / area[-1], (scales / scales[-1]) ** 2, rtol=0.03)
  # Absolute areas from the shape definitions: square half-side 0.7 r, ellipse semi-axes
  # (r, 0.6 r), equilateral triangle of circumradius 1.05 r.
  f = np.array([[0, 3, 0, 4, 4, 0], [1, 3, 0, 4, 4, 0], [2, 3, 0, 4, 4, 0]])
  area = shapes.coverage(f, SIZE).sum(axis=(1, 2))
  r = radius_px
  expected = [(1.4 * r) ** 2, np.pi * 0.6 * r * r, 3 * np.sqrt(3) / 4 * (1.05 * r) ** 2]
  np.testing.assert_allclose(area, expected, rtol=0.02)


def test_rotation_turns_the_ellipse_major_axis():
  f = np.array([[1, 3, k, 4, 4, 0] for k in range(5)])
  for k, cov in enumerate(shapes.coverage(f, SIZE)):
    c = _moments(cov)[3]
    # Orientation of the major axis, x right / y down (clockwise on screen).
    angle = 0.5 * np.degrees(np.arctan2(2 * c[0, 1], c[0, 0] - c[1, 1]))
    assert abs(angle - 18.0 * k) < 1.0, (k, angle)


def test_colour_factor_sets_the_colour():
  names = ('white', 'red', 'green', 'blue', 'yellow', 'cyan')
  f = np.array([[0, 3, 0, 4, 4, c] for c in range(6)])
  rgb = shapes.render(f, SIZE, channels=3)
  c = int((0.28 + 0.44 / 7 * 4) * SIZE)  # a pixel inside the square centred at index 4
  centre = rgb[:, c, c]
  np.testing.assert_allclose(centre, [EXPECTED_RGB[n] for n in names], atol=1e-6)
  gray = shapes.render(f, SIZE, channels=1)
  luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  np.testing.assert_allclose(gray[..., 0], luma, atol=1e-6)
  assert len(np.unique(np.round(luma.max(axis=(1, 2)), 4))) == 6  # colours survive gray


def test_antialiased_edges_and_inside_the_image():
  f = shapes.sample_factors(1, 'train', 500, 100)
  # Extreme positions and the largest scale must still fit.
  f[:100, 1] = 3
  f[:50, 3:5] = 0
  f[50:100, 3:5] = 7
  cov = shapes.coverage(f, SIZE)
  assert cov[:, 0, :].max() == 0 and cov[:, -1, :].max() == 0
  assert cov[:, :, 0].max() == 0 and cov[:, :, -1].max() == 0
  partial = (cov > 0) & (cov < 1)
  assert partial.sum(axis=(1, 2)).min() > 0  # supersampling leaves fractional edge pixels


def test_stored_pixels_are_the_rendered_coverage_rounded_to_bytes():
  # Rounded, not truncated: an edge pixel's 0.999 of 255 is 255, not 254.
  f = shapes.sample_factors(2, 'train', 50, 100)
  rendered = shapes.render(f, SIZE) * 255.0
  np.testing.assert_array_equal(shapes.render_uint8(f, SIZE), np.round(rendered))
  assert (np.round(rendered) != np.floor(rendered)).any()  # the sample tells them apart


def test_an_empty_split_is_refused():
  for field in ('num_train', 'num_eval'):
    config = _config()
    config.shapes[field] = 0
    with pytest.raises(data.DataError, match=f'config.shapes.{field} must be > 0, got 0'):
      data.load(config, 'train' if field == 'num_train' else 'eval')


def test_grayscale_load():
  src = data.load(_config(channels=1), 'eval')
  assert src.get(np.arange(3)).shape == (3, SIZE, SIZE, 1)


def test_bad_factors_raise():
  with pytest.raises(ValueError):
    shapes.coverage(np.array([[4, 0, 0, 0, 0, 0]]), SIZE)
  with pytest.raises(ValueError):
    shapes.sample_factors(0, 'test', 3, 3)
  with pytest.raises(ValueError):
    shapes.sample_factors(0, 'eval', 3, 30720 // 2 + 1)
  no_eval = _config()
  no_eval.shapes.num_eval = 0
  with pytest.raises(data.DataError, match='num_eval must be in 1..15360'):
    data.load(no_eval, 'train')
  # A negative seed is named as such (it read 'config.shapes.expected non-negative integer').
  with pytest.raises(ValueError, match='^seed must be a whole number >= 0, got -2$'):
    shapes.sample_factors(-2, 'eval', 3, 3)
  # Nor a fraction (a seed of 1.7 drew seed 1's factors; 2.5 images failed inside numpy).
  for args, message in (((1.7, 'eval', 3, 3), 'seed must be a whole number >= 0, got 1.7'),
                        ((0, 'train', 2.5, 3), 'num_train must be a whole number >= 0, got 2.5'),
                        ((0, 'train', -5, 3), 'num_train must be a whole number >= 0, got -5'),
                        ((0, 'eval', 3, 100.0), 'num_eval must be a whole number >= 0, got 100.0')):
    with pytest.raises(ValueError) as info:
      shapes.sample_factors(*args)
    assert str(info.value) == message
  assert len(shapes.sample_factors(np.int64(1), 'train', np.int32(0), 3)) == 0
  with pytest.raises(data.DataError, match=r'^the data seed must be >= 0 \(config.seed\)'):
    data.load(_config(seed=-1), 'eval')
  # Rows of another length, and a negative index (it would wrap to the last value).
  for factors in (np.zeros((1, 5), np.int64), np.zeros((1, 7), np.int64)):
    with pytest.raises(ValueError, match=r'factors must be \(N, 6\)'):
      shapes.coverage(factors, SIZE)
  with pytest.raises(ValueError, match='factor indices out of range'):
    shapes.coverage(np.array([[0, 0, 0, 0, 0, -1]]), SIZE)
  # Float indices, even whole ones, failed inside numpy's indexing.
  with pytest.raises(ValueError, match='^factors must be integer indices, got dtype float64$'):
    shapes.render(np.array([[0, 1.0, 0, 0, 0, 0]]), SIZE)
  # No rows at all are no images, whatever their dtype (np.zeros((0, 6)) is float64).
  assert shapes.render(np.zeros((0, 6)), SIZE).shape == (0, SIZE, SIZE, 3)
  for channels in (2, 4):
    with pytest.raises(ValueError, match=f'channels must be 1 or 3, got {channels}'):
      shapes.render(np.array([[0, 3, 0, 4, 4, 0]]), SIZE, channels=channels)


def test_the_factor_values_handed_out_are_copies():
  shapes.factor_values()[1][:] = 0.0  # a caller's change to its scales
  assert (shapes.factor_values()[1] > 0).all()


@pytest.mark.parametrize('kwargs', [
    dict(image_size=0), dict(image_size=-3), dict(image_size=5.5), dict(image_size=True),
    dict(image_size=SIZE, supersample=0), dict(image_size=SIZE, supersample=-2),
    dict(image_size=SIZE, chunk=0), dict(image_size=SIZE, chunk=-1)])
def test_bad_sizes_raise_naming_the_size(kwargs):
  # 0 gave empty images, 5.5 images of side 5, supersample -2 the samples of 2, and
  # supersample 0 a ZeroDivisionError; -3 failed inside numpy with 'negative dimensions';
  # a chunk of -1 gave blank images, one of 0 range()'s error.
  name = next((k for k in ('supersample', 'chunk') if k in kwargs), 'image_size')
  draw = shapes.coverage if name == 'chunk' else shapes.render
  with pytest.raises(ValueError, match=rf'^{name} must be a whole number >= 1, got '):
    draw(np.array([[0, 3, 0, 4, 4, 0]]), **kwargs)


def test_every_combination_is_its_own_image_from_the_smallest_size_allowed():
  # Counted on the images themselves: at MIN_IMAGE_SIZE no two of the 30,720 coincide, one
  # pixel smaller some do, and the dataset refuses that size.
  combos = np.stack(np.meshgrid(*[np.arange(n) for n in (4, 4, 5, 8, 8, 6)],
                                indexing='ij'), -1).reshape(-1, 6)
  for size, distinct in ((shapes.MIN_IMAGE_SIZE, True), (shapes.MIN_IMAGE_SIZE - 1, False)):
    images = shapes.render_uint8(combos, size).reshape(len(combos), -1)
    assert (len(np.unique(images, axis=0)) == 30720) == distinct, size
  with pytest.raises(data.DataError, match=rf'^shapes needs image_size >= '
                                           rf'{shapes.MIN_IMAGE_SIZE}, got 8: smaller'):
    data.load(_config(image_size=8), 'train')


def test_images_smaller_than_a_shapes_window_render():
  # The sampling window is clipped to the image (at one pixel it was an IndexError).
  for size in (1, 2):
    image = shapes.coverage(np.array([[0, 3, 0, 4, 4, 0]]), size)
    assert image.shape == (1, size, size) and 0 <= image.min() and image.max() <= 1
    assert image.sum() > 0


def test_small_whole_sizes_render():
  # The smallest sizes still render the shape, in range: a scale-1 square of half-side
  # 0.7 * 0.2 * 8 = 1.12 px centred at 0.28 * 8 = 2.24 px covers (2 * 1.12)**2 pixels.
  image = shapes.render(np.array([[0, 3, 0, 0, 0, 0]]), np.int64(8))
  assert image.shape == (1, 8, 8, 3) and 0 <= image.min() and image.max() <= 1
  np.testing.assert_allclose(image[0, ..., 0].sum(), (2 * 1.12) ** 2, rtol=0.02)
