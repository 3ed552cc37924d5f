"""Tests for avae_jax.summary: jsonl, TensorBoard events (read back), progress line."""

import contextlib
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


def test_an_appending_writer_starts_a_new_line_after_a_crash(tmp_path):
  # eval.py's writer has no start_step: it appends to what a crashed eval.py left.
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.')  # cut short by a crash
  with summary.SummaryWriter(tmp_path) as writer:
    writer.scalars(3, {'a': 3.0})
  assert path.read_text() == '{"step": 1, "a": 1.0}\n{"step": 3, "a": 3.0}\n'
  # A whole record whose newline was cut is kept, and the next starts its own line.
  path.write_text('{"step": 1, "a": 1.0}')
  with summary.SummaryWriter(tmp_path) as writer:
    writer.scalars(2, {'a': 2.0})
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      {'step': 1, 'a': 1.0}, {'step': 2, 'a': 2.0}]


def test_a_resumed_run_replaces_what_the_stopped_run_logged_after_its_checkpoint(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  with summary.SummaryWriter(tmp_path, start_step=0) as writer:
    for step in range(1, 5):
      writer.scalars(step, {'loss': float(step)})
  with open(tmp_path / 'metrics.jsonl', 'ab') as f:
    # Damage: bytes that are not UTF-8 and a step that is not a number (both were a
    # traceback), a record without a step (it was kept), a boolean step, a JSON value that
    # is not a record; then a line cut short by a crash (a full disk, say).
    f.write(b'\x9b\xff{"step": 2}\n{"step": null}\n{"loss": 2.0}\n{"step": true}\n[2]\n'
            b'{"step": 5, "loss": 5.')
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
  # Only a line cut short after whole ones: dropped too, not joined to the next record.
  (tmp_path / 'cut').mkdir()
  cut = tmp_path / 'cut' / 'metrics.jsonl'
  cut.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  with summary.SummaryWriter(tmp_path / 'cut', start_step=1) as writer:
    writer.scalars(2, {'loss': 2.0})
  assert [json.loads(line) for line in cut.read_text().splitlines()] == [
      {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0}]


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='no /dev/full')
def test_a_full_disk_under_the_log_names_the_file(tmp_path):
  # write(2) on a full disk names no file: the one-line error must say which one filled.
  writer = summary.SummaryWriter(str(tmp_path))
  writer._jsonl.close()
  full = writer._jsonl = open('/dev/full', 'a', encoding='utf-8')  # every write: ENOSPC
  try:
    with pytest.raises(OSError) as info:
      writer.scalars(1, {'loss': 1.0})
    assert str(info.value) == "[Errno 28] No space left on device: '/dev/full'"
  finally:
    with contextlib.suppress(OSError):  # its buffer is still full of the line
      full.close()
    writer._jsonl = open(os.devnull, 'a', encoding='utf-8')
    writer.close()


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
    with pytest.raises(ValueError, match='keys that name the same metric: 1$'):
      writer.scalars(1, {1: 0.5, '1': 0.25, 'loss': 1.0})
    for value in (None, 'high', 1j):
      with pytest.raises(ValueError, match=r"Metric 'loss' is not a number: "):
        writer.scalars(1, {'loss': value})
    with pytest.raises(ValueError, match='H, W, C'):
      writer.image(1, 'x', np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match='uint8 or float image; got bool'):
      writer.image(1, 'x', np.ones((2, 2, 1), bool))
    # An integer image of 0..255 that is not uint8 is not a float in [0, 1] either.
    for dtype in (np.int32, np.uint16):
      with pytest.raises(ValueError, match=f'uint8 or float image; got {np.dtype(dtype)}'):
        writer.image(1, 'x', np.full((2, 2, 1), 128, dtype))
  # RGBA is an image too.
  with Image.open(io.BytesIO(summary.encode_png(np.full((2, 3, 4), 0.5)))) as im:
    assert (im.mode, im.size) == ('RGBA', (3, 2))


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
  times = iter([100.0, 110.0, 115.0, 116.0, 117.0])
  lines = []
  progress = summary.ProgressLogger(950, 100, clock=lambda: next(times), log=lines.append)
  assert progress.update(50) is None  # not due: no clock read, no line
  line = progress.update(100, {'loss': np.float32(1.25)})
  # 100 steps in 10 s -> 10 steps/s; 850 left -> 85 s.
  assert line == ('step 100/950 (10.5%) | 10.00 steps/s | ETA 0:01:25 | '
                  'elapsed 0:00:10 | loss 1.25')
  # The rate is that of the last interval: 100 steps in 5 s.
  assert progress.update(200) == ('step 200/950 (21.1%) | 20.00 steps/s | ETA 0:00:38 | '
                           'elapsed 0:00:15')
  # A step off the interval only when forced (a run that stops there): 30 steps in 1 s.
  assert progress.update(230) is None
  assert progress.update(230, force=True).startswith('step 230/950 (24.2%) | 30.00 steps/s | ')
  # The last step is always reported, even off the interval.
  assert progress.update(950).startswith('step 950/950 (100.0%) | 720.00 steps/s | ETA 0:00:00')
  assert len(lines) == 4 and lines[0] == line


def test_progress_logger_resumed_and_disabled():
  times = iter([0.0, 4.0])
  progress = summary.ProgressLogger(1000, 100, start_step=600, clock=lambda: next(times),
                                    log=lambda _: None)
  assert progress.update(700).startswith('step 700/1000 (70.0%) | 25.00 steps/s | ETA 0:00:12')
  quiet = summary.ProgressLogger(1000, 100, enabled=False, clock=lambda: 0.0)
  assert quiet.update(100) is None
  assert quiet.compiling(0) is None
  # A run resumed at its last step has no step left to compile: no line.
  done = summary.ProgressLogger(1000, 100, start_step=1000, clock=lambda: 0.0,
                                log=lambda _: pytest.fail('logged'))
  assert done.compiling(1000) is None


# Pre-training steps 1-12, adversarial steps 13-32 at twice the time per step and twice
# the compilation time (beyond a step) of pre-training, until they are timed.
PHASES = [summary.Phase('pre-training', 12),
          summary.Phase('adversarial', 32, step_cost=2.0, compile_cost=2.0)]


def _fake_clock(times):
  it = iter(times)
  return lambda: next(it)


def test_progress_leaves_the_time_paused_out_of_the_rate_and_eta():
  progress = summary.ProgressLogger(
      30, 10, log=lambda _: None, clock=_fake_clock([0.0, 2.0, 32.0, 40.0, 44.0]))
  with progress.paused():  # from t=2 to 32
    pass
  # Steps 1-10 in 40 - 30 s: 1 step/s, 20 s left; the elapsed time includes the pause.
  assert progress.update(10) == 'step 10/30 (33.3%) | 1.00 steps/s | ETA 0:00:20 | elapsed 0:00:40'
  # Outside `paused`, the time counts: steps 11-20 in 4 s.
  assert progress.update(20).startswith('step 20/30 (66.7%) | 2.50 steps/s | ETA 0:00:04 |')
  quiet = summary.ProgressLogger(30, 10, enabled=False, clock=_fake_clock([0.0]))
  with quiet.paused():  # no clock read
    pass


def test_progress_eta_leaves_out_compilation_and_estimates_the_next_phase():
  lines = []
  progress = summary.ProgressLogger(
      32, 5, phases=PHASES, log=lines.append,
      clock=_fake_clock([0.0, 1.0, 11.0, 15.0, 20.0, 22.0, 23.0, 43.0, 49.0, 64.0]))
  assert progress.compiling(0) == 'compiling the pre-training step ...'  # at t=1
  progress.compiled(1)  # t=11: the first step took 10 s
  # Steps 2-5 in 4 s: 1 s per step. Left: 7 pre-training steps (7 s), 20 adversarial
  # steps at 2 s (40 s), and the adversarial compilation: the pre-training one took 9 s
  # beyond a step, times 2 (18 s). 7 + 40 + 18 = 65 s.
  assert progress.update(5) == ('step 5/32 (15.6%) | 1.00 steps/s | ETA 0:01:05 | '
                         'elapsed 0:00:15')
  assert progress.update(10).startswith('step 10/32 (31.2%) | 1.00 steps/s | ETA 0:01:00 |')
  assert progress.update(11) is None
  # The end of a phase is reported off the interval: 40 + 18 s left.
  assert progress.update(12).startswith('step 12/32 (37.5%) | 1.00 steps/s | ETA 0:00:58 |')
  assert progress.compiling(12) == 'compiling the adversarial step ...'  # t=23
  progress.compiled(13)  # t=43
  # Steps 14-15 in 6 s: the adversarial steps' own 3 s replaces the estimate; 17 left.
  assert progress.update(15) == ('step 15/32 (46.9%) | 0.33 steps/s | ETA 0:00:51 | '
                          'elapsed 0:00:49')
  assert progress.update(20).startswith('step 20/32 (62.5%) | 0.33 steps/s | ETA 0:00:36 |')
  assert lines[0] == 'compiling the pre-training step ...'
  assert lines[4] == 'compiling the adversarial step ...' and len(lines) == 7


def test_progress_eta_of_a_run_resumed_in_the_adversarial_phase():
  lines = []
  progress = summary.ProgressLogger(32, 5, start_step=20, phases=PHASES, log=lines.append,
                                    clock=_fake_clock([0.0, 0.5, 30.5, 34.5]))
  assert progress.compiling(20) == 'compiling the adversarial step ...'
  progress.compiled(21)
  assert progress.update(21) is None  # not due: no clock read
  # Steps 22-25 in 4 s; 7 steps left at 1 s each.
  assert progress.update(25) == ('step 25/32 (78.1%) | 1.00 steps/s | ETA 0:00:07 | '
                          'elapsed 0:00:34')
  assert len(lines) == 2
  # Logged at every step: the line of the compiling step has nothing timed yet.
  every_step = summary.ProgressLogger(32, 1, start_step=20, phases=PHASES, log=lambda _: None,
                                      clock=_fake_clock([0.0, 0.5, 30.0, 31.0, 32.0]))
  every_step.compiling(20)
  every_step.compiled(21)
  assert every_step.update(21).startswith(
      'step 21/32 (65.6%) | ? steps/s | ETA ? | elapsed 0:00:31')
  # Step 22 in 1 s (from t=31, when step 21's line was logged): 10 steps left.
  assert every_step.update(22).startswith('step 22/32 (68.8%) | 1.00 steps/s | ETA 0:00:10 |')


def test_progress_eta_shares_a_stretch_over_two_phases_by_their_costs():
  # A caller that logs neither the phase end nor the compilation: steps 1-20 in 40 s, ten
  # at 1 unit and ten at 3 units: 1 s per unit, so the 10 steps left take 30 s.
  phases = [summary.Phase('a', 10), summary.Phase('b', 30, step_cost=3.0)]
  progress = summary.ProgressLogger(30, 20, phases=phases, log=lambda _: None,
                                    clock=_fake_clock([0.0, 40.0]))
  assert progress.update(20).startswith('step 20/30 (66.7%) | 0.50 steps/s | ETA 0:00:30 |')


def test_progress_eta_scales_from_a_phase_of_other_costs():
  # Phase a (steps 1-10) costs 2 units a step and 2 to compile; b (11-20) 1 and 1; c
  # (21-30) 4 and 6. Timed: a's first step 9 s (8 beyond a step), steps 2-5 in 4 s.
  phases = [summary.Phase('a', 10, step_cost=2.0, compile_cost=2.0), summary.Phase('b', 20),
            summary.Phase('c', 30, step_cost=4.0, compile_cost=6.0)]
  progress = summary.ProgressLogger(30, 5, phases=phases, log=lambda _: None,
                                    clock=_fake_clock([0.0, 1.0, 10.0, 14.0]))
  progress.compiling(0)
  progress.compiled(1)
  # a: 5 steps x 1 s; b: 10 x 1/2 s, compiling 8 x 1/2 s; c: 10 x 4/2 s, compiling
  # 8 x 6/2 s. 5 + 5 + 4 + 20 + 24 = 58 s.
  assert progress.update(5) == 'step 5/30 (16.7%) | 1.00 steps/s | ETA 0:00:58 | elapsed 0:00:14'


def test_a_phase_of_one_step_is_its_own():
  # Its last step is its first: it was taken for the next phase's.
  progress = summary.ProgressLogger(5, 1, phases=[summary.Phase('a', 1), summary.Phase('b', 5)],
                                    log=lambda _: None, clock=_fake_clock([0.0, 1.0, 2.0, 3.0]))
  assert progress.compiling(0) == 'compiling the a step ...'
  progress.compiled(1)
  assert progress.compiling(1) == 'compiling the b step ...'


def test_progress_phases_must_end_at_the_total():
  with pytest.raises(ValueError, match='not at total_steps 40'):
    summary.ProgressLogger(40, 5, phases=PHASES)
  for costs in ({'step_cost': 0.0}, {'compile_cost': 0.0}):
    with pytest.raises(ValueError, match="phase 'b': the costs must be positive"):
      summary.ProgressLogger(32, 5, phases=[PHASES[0], summary.Phase('b', 32, **costs)])
  with pytest.raises(ValueError, match='before the phase ahead'):
    summary.ProgressLogger(32, 5, phases=PHASES[::-1])
  # An empty phase (no adversarial steps) is dropped.
  progress = summary.ProgressLogger(12, 5, phases=[PHASES[0], summary.Phase('adversarial', 12)],
                                    log=lambda _: None, clock=_fake_clock([0.0, 1.0]))
  assert progress.compiling(0) == 'compiling the pre-training step ...'


def test_progress_eta_of_a_phase_not_started_scales_from_the_phase_timed_last():
  """With two phases timed, a third not started takes the step time and the compiling
  time (beyond a step) of the phase timed last, b, not of a, each scaled by c's costs."""
  phases = [summary.Phase('a', 10), summary.Phase('b', 20, step_cost=2.0, compile_cost=2.0),
            summary.Phase('c', 30, step_cost=4.0, compile_cost=4.0)]
  progress = summary.ProgressLogger(
      30, 10, phases=phases, log=lambda _: None,
      clock=_fake_clock([0.0, 0.0, 10.0, 19.0, 19.0, 60.0, 72.0]))
  progress.compiling(0)
  progress.compiled(1)  # t=10: a's first step took 10 s; steps 2-10 in 9 s (1 s each)
  progress.update(10)
  progress.compiling(10)
  progress.compiled(11)  # t=60: b's first step took 41 s, 38 s beyond a step of 3 s
  # Steps 12-15 in 12 s: 3 s per b step (not a's 1 s scaled by 2). Left: 5 b steps (15 s),
  # 10 c steps at 3 * 4/2 = 6 s (60 s), c's compilation 38 * 4/2 (76 s): 151 s.
  assert progress.update(15, force=True) == (
      'step 15/30 (50.0%) | 0.33 steps/s | ETA 0:02:31 | elapsed 0:01:12')
