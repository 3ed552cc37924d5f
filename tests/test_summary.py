"""Tests for avae_jax.summary: jsonl, TensorBoard events (read back), progress line."""

import glob
import io
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from avae_jax import summary


def _write_run(workdir):
  rng = np.random.default_rng(0)
  image_u8 = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  with summary.SummaryWriter(workdir) as writer:
    writer.scalars(1, {'train/loss': 1.5, 'train/kl': np.float32(0.25)})
    writer.scalars(2, {'train/loss': jnp.asarray(0.75), 'train/kl': np.array([0.125])})
    writer.image(2, 'samples', image_u8)
    writer.image(3, 'gray', np.full((4, 7), 0.25, np.float32))
    writer.text(0, 'config', 'batch_size: 64')
  return image_u8


def test_metrics_jsonl(tmp_path):
  _write_run(tmp_path)
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {'step': 1, 'train/loss': 1.5, 'train/kl': 0.25},
      {'step': 2, 'train/loss': 0.75, 'train/kl': 0.125}]
  # A resumed run appends.
  with summary.SummaryWriter(tmp_path) as writer:
    writer.scalars(3, {'train/loss': 0.5})
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(lines[-1]) == {'step': 3, 'train/loss': 0.5}
  assert len(lines) == 3


def test_a_resumed_run_replaces_what_the_stopped_run_logged_after_its_checkpoint(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  with summary.SummaryWriter(tmp_path, start_step=0) as writer:
    for step in range(1, 5):
      writer.scalars(step, {'loss': float(step)})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "loss": 5.')  # cut short by a crash (a full disk, say)
  # Resumed from the checkpoint of step 2: steps 3 and 4 are trained and logged again.
  with summary.SummaryWriter(tmp_path, start_step=2) as writer:
    for step in (3, 4):
      writer.scalars(step, {'loss': 10.0 * step})
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0},
                   {'step': 3, 'loss': 30.0}, {'step': 4, 'loss': 40.0}]
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [
      (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_event_file_read_back_with_tensorboard(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  image_u8 = _write_run(tmp_path)
  acc = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.IMAGES: 0,
                                    event_accumulator.SCALARS: 0})
  acc.Reload()
  loss = [(e.step, e.value) for e in acc.Scalars('train/loss')]
  kl = [(e.step, e.value) for e in acc.Scalars('train/kl')]
  assert loss == [(1, 1.5), (2, 0.75)]
  assert kl == [(1, 0.25), (2, 0.125)]
  (event,) = acc.Images('samples')
  assert (event.step, event.height, event.width) == (2, 6, 5)
  decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
  np.testing.assert_array_equal(decoded, image_u8)
  (event,) = acc.Images('gray')
  decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
  # 0.25 * 255 = 63.75 -> 64, one channel.
  np.testing.assert_array_equal(decoded, np.full((4, 7), 64, np.uint8))


def test_event_file_read_back_with_tensorflow(tmp_path):
  tf = pytest.importorskip('tensorflow')
  image_u8 = _write_run(tmp_path)
  (path,) = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  scalars, images, texts = {}, {}, {}
  for event in tf.compat.v1.train.summary_iterator(path):
    for value in event.summary.value:
      if value.HasField('simple_value'):
        scalars[(value.tag, event.step)] = value.simple_value
      elif value.HasField('image'):
        images[(value.tag, event.step)] = value.image.encoded_image_string
      elif value.metadata.plugin_data.plugin_name == 'text':
        texts[(value.tag, event.step)] = tf.make_ndarray(value.tensor)
  assert scalars == {('train/loss', 1): 1.5, ('train/kl', 1): 0.25,
                     ('train/loss', 2): 0.75, ('train/kl', 2): 0.125}
  np.testing.assert_array_equal(tf.io.decode_png(images[('samples', 2)]).numpy(), image_u8)
  assert set(images) == {('samples', 2), ('gray', 3)}
  assert texts[('config', 0)] == b'batch_size: 64'


def test_local_events_need_no_tensorflow(tmp_path):
  # A local workdir's events are written without importing TensorFlow (0.5 GiB), and
  # every event is on disk as soon as it is written (nothing waits for a flush).
  code = ('import sys\n'
          'from avae_jax import summary\n'
          f'w = summary.SummaryWriter({str(tmp_path)!r})\n'
          'w.scalars(1, {"loss": 1.0})\n'
          'w.text(0, "config", "x")\n'
          'import glob, os\n'
          f'path, = glob.glob({str(tmp_path)!r} + "/events.out.tfevents.*")\n'
          'size = os.path.getsize(path)\n'
          'w.close()\n'
          'assert os.path.getsize(path) == size > 0, size\n'
          'assert "tensorflow" not in sys.modules\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root)


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = summary.SummaryWriter(workdir, enabled=False)
  writer.scalars(1, {'loss': 1.0})
  writer.image(1, 'x', np.zeros((2, 2, 3), np.float32))
  writer.text(1, 't', 'x')
  writer.flush()
  writer.close()
  assert not workdir.exists()


def test_bad_inputs(tmp_path):
  with summary.SummaryWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match='not a scalar'):
      writer.scalars(1, {'loss': np.zeros(3)})
    with pytest.raises(ValueError, match='reserved'):
      writer.scalars(1, {'step': 3})
    with pytest.raises(ValueError, match='H, W, C'):
      writer.image(1, 'x', np.zeros((2, 2, 2), np.float32))


def test_to_uint8_image():
  x = np.array([[-0.5, 0.0, 0.25], [0.5, 1.0, 2.0]], np.float32)
  # round(v * 255) after clipping to [0, 1]: 63.75 -> 64, 127.5 -> 128 (half to even).
  expected = np.array([[0, 0, 64], [128, 255, 255]], np.uint8)[..., None]
  np.testing.assert_array_equal(summary.to_uint8_image(x), expected)
  rgb = np.zeros((2, 3, 3), np.uint8)
  assert summary.to_uint8_image(rgb) is rgb
  # bfloat16 (the compute option's dtype) is not a numpy number type, but a float.
  np.testing.assert_array_equal(summary.to_uint8_image(x.astype(jnp.bfloat16)), expected)


def test_format_duration():
  assert summary.format_duration(0) == '0:00:00'
  assert summary.format_duration(90) == '0:01:30'
  assert summary.format_duration(86400 + 3661) == '1d 1:01:01'
  assert summary.format_duration(float('nan')) == '?'


def test_progress_logger_rate_and_eta():
  times = iter([100.0, 110.0, 115.0, 116.0])
  lines = []
  progress = summary.ProgressLogger(950, 100, clock=lambda: next(times), log=lines.append)
  assert progress(50) is None  # not due: no clock read, no line
  line = progress(100, {'loss': np.float32(1.25)})
  # 100 steps in 10 s -> 10 steps/s; 850 left -> 85 s.
  assert line == ('step 100/950 (10.5%) | 10.00 steps/s | ETA 0:01:25 | '
                  'elapsed 0:00:10 | loss 1.25')
  # The rate is that of the last interval: 100 steps in 5 s.
  assert progress.update(200) == ('step 200/950 (21.1%) | 20.00 steps/s | ETA 0:00:38 | '
                           'elapsed 0:00:15')
  # The last step is always reported, even off the interval.
  assert progress(950).startswith('step 950/950 (100.0%) | 750.00 steps/s | ETA 0:00:00')
  assert len(lines) == 3 and lines[0] == line


def test_progress_logger_resumed_and_disabled():
  times = iter([0.0, 4.0])
  progress = summary.ProgressLogger(1000, 100, start_step=600, clock=lambda: next(times),
                                    log=lambda _: None)
  assert progress(700).startswith('step 700/1000 (70.0%) | 25.00 steps/s | ETA 0:00:12')
  quiet = summary.ProgressLogger(1000, 100, enabled=False, clock=lambda: 0.0)
  assert quiet(100) is None
