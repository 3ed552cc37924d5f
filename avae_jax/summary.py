"""Training summaries: TensorBoard event files, metrics.jsonl and a progress line.

TensorBoard events are protobuf records in tensorboard's event-file format. A
local workdir gets them from a plain file (`_LocalEventFile`); only a remote one
(gs://...) goes through tensorboard's own writer, which needs TensorFlow's gfile.
(Tensorboard's writer imports TensorFlow whenever it is installed, and importing it
costs about 0.5 GiB of resident memory and seconds of start-up.)
Scalars are also appended to `<workdir>/metrics.jsonl`, one JSON object per
call: {"step": 100, "loss": 1.25, ...}; NaN and infinities are written as
Python's json writes them (NaN, Infinity). A run that resumes at step S
(`start_step`) first drops the lines of steps after S, written by the run that
stopped, and a half-written last line; its event file starts with a SessionLog
START at S + 1, which makes TensorBoard drop the older files' points from there.
A writer without `start_step` (eval.py) appends, after dropping a half-written last line
(the next record would otherwise continue it, and both lines would be unreadable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import logging as std_logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import event_file_writer
from tensorboard.summary.writer import record_writer

from avae_jax import config_lib
from avae_jax import files


def to_uint8(x: Any) -> np.ndarray:
  """Maps floats in [0, 1] (clipped, NaN as 0) to uint8 by rounding; uint8 passes through."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x
  x = np.nan_to_num(x.astype(np.float32), nan=0.0)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_uint8_image(image: Any) -> np.ndarray:
  """Returns an image (H,W), (H,W,C) uint8, or float in [0,1], as uint8 (H,W,C), C in 1,3,4."""
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f'Expected an (H, W, C) image with C in 1, 3, 4; got {array.shape}.')
  # bfloat16 (ml_dtypes) is not a numpy floating type; its name says what it is. Other
  # integer types are refused: an int32 image of 0..255 read as [0, 1] came out binary.
  floating = np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16'
  if array.dtype != np.uint8 and not floating:
    raise ValueError(f'Expected a uint8 or float image; got {array.dtype}.')
  return to_uint8(array)


def encode_png(image: Any) -> bytes:
  """Returns the PNG encoding of an image accepted by `to_uint8_image`."""
  array = to_uint8_image(image)
  pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  buffer = io.BytesIO()
  pil.save(buffer, format='PNG')
  return buffer.getvalue()


def _scalar(name: str, value: Any) -> float:
  """Returns a metric value (Python, numpy or jax scalar) as a float."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f'Metric {name!r} is not a scalar: shape {array.shape}.')
  try:
    return float(array.reshape(()))
  except (TypeError, ValueError):  # None, a word, a complex number: name the metric
    raise ValueError(f'Metric {name!r} is not a number: {value!r}.') from None


_FILE_IDS = itertools.count()


def _drop_lines_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without the lines of steps after `step` and broken lines."""
  if not os.path.exists(path):
    return
  # Bytes: a damaged line that is not UTF-8 is a broken line, not a failure to read.
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  kept = []
  for line in lines:
    record = files.jsonl_record(line)  # None: '' after the last newline, a cut or damaged line
    if record is not None and record['step'] <= step:
      kept.append(line.decode('utf-8') + '\n')
  if len(kept) != len(lines) - 1 or lines[-1]:
    files.write_text(path, ''.join(kept))


def _drop_cut_last_line(path: str) -> None:
  """Drops a last line without its newline that is not JSON (cut by a crash); ends a whole one."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    start = data.rfind(b'\n') + 1
    if start == len(data):
      return
    try:
      json.loads(data[start:])
    except ValueError:
      f.truncate(start)
      return
    f.write(b'\n')


class _LocalEventFile:
  """A TensorBoard event file on the local filesystem, each event flushed as written."""

  def __init__(self, logdir: str):
    """Creates logdir and a new events.out.tfevents.* file in it (tensorboard's naming)."""
    os.makedirs(logdir, exist_ok=True)
    name = 'events.out.tfevents.%010d.%s.%d.%d' % (
        time.time(), socket.gethostname(), os.getpid(), next(_FILE_IDS))
    self._path = os.path.join(logdir, name)
    self._records = record_writer.RecordWriter(open(self._path, 'wb'))
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def add_event(self, event: event_pb2.Event) -> None:
    """Appends one event record and flushes it, so a crashed run keeps its events."""
    with files.naming_failures(self._path):
      self._records.write(event.SerializeToString())
      self._records.flush()

  def flush(self) -> None:
    """Flushes the file (every event already is)."""
    self._records.flush()

  def close(self) -> None:
    """Closes the file."""
    self._records.close()


class SummaryWriter:
  """Writes scalars, images and text to TensorBoard and scalars to metrics.jsonl."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               *, flush_secs: float = 30.0, start_step: int | None = None):
    """Opens the writers; with enabled=False (non-zero processes) does nothing at all.

    start_step: where a training run starts (0, or the checkpoint it resumes from).
    Everything the workdir holds for later steps came from a run that stopped after
    that checkpoint and is replayed now: it is dropped (module docstring).
    """
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._events = None
    self._jsonl = None
    if not enabled:
      return
    if files.is_remote(self.workdir):
      self._events = event_file_writer.EventFileWriter(
          self.workdir, max_queue_size=100, flush_secs=flush_secs)
      # Object stores cannot append; TensorBoard events still hold everything.
      logging.warning('Not writing %s for the non-local workdir %s.',
                      config_lib.TRAIN_LOG_FILE, self.workdir)
    else:
      self._events = _LocalEventFile(self.workdir)
      path = os.path.join(self.workdir, config_lib.TRAIN_LOG_FILE)
      if start_step is not None:
        _drop_lines_after(path, int(start_step))
      else:
        _drop_cut_last_line(path)
      self._jsonl = open(path, 'a', encoding='utf-8')
    if start_step is not None:
      self._events.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(start_step) + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _write(self, step: int, summary: summary_pb2.Summary) -> None:
    """Writes one summary event (tensorboard's writer for a gs:// workdir queues it)."""
    self._events.add_event(
        event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes scalar metrics (Python/numpy/jax scalars) for `step`."""
    if not self.enabled:
      return
    names = [str(k) for k in values]
    if 'step' in names:
      raise ValueError("'step' is reserved for the step number.")
    if len(set(names)) < len(names):  # 1 and '1': one tag, one of the values lost
      twice = sorted({n for n in names if names.count(n) > 1})
      raise ValueError(f'keys that name the same metric: {", ".join(twice)}')
    floats = {str(k): _scalar(k, v) for k, v in values.items()}
    self._write(step, summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v)
        for k, v in floats.items()]))
    if self._jsonl is not None:
      with files.naming_failures(self._jsonl.name):
        self._jsonl.write(json.dumps({'step': int(step), **floats}) + '\n')
        self._jsonl.flush()  # A crashed run still has its metrics.

  def image(self, step: int, name: str, image: Any) -> None:
    """Writes one image ((H,W,C) uint8, or float in [0,1]) for `step`."""
    if not self.enabled:
      return
    array = to_uint8_image(image)
    proto = summary_pb2.Summary.Image(
        height=array.shape[0], width=array.shape[1],
        colorspace=array.shape[2], encoded_image_string=encode_png(array))
    self._write(step, summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=name, image=proto)]))

  def text(self, step: int, name: str, text: str) -> None:
    """Writes a (markdown) text, e.g. the config, for `step`."""
    if not self.enabled:
      return
    self._write(step, text_summary.text_pb(name, text))

  def flush(self) -> None:
    """Writes everything queued to disk."""
    if self._events is not None:
      self._events.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    """Flushes and closes the files (idempotent)."""
    if self._events is not None:
      self._events.close()
      self._events = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    self.enabled = False

  def __enter__(self) -> SummaryWriter:
    """Returns self; `with` closes the writer."""
    return self

  def __exit__(self, *exc_info: Any) -> None:
    """Flushes and closes the writer."""
    self.close()


def format_duration(seconds: float) -> str:
  """Returns seconds as 'H:MM:SS' ('Dd H:MM:SS' past a day; '?' if unknown)."""
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  days, seconds = divmod(seconds, 86400)
  hours, seconds = divmod(seconds, 3600)
  minutes, seconds = divmod(seconds, 60)
  clock = f'{hours}:{minutes:02d}:{seconds:02d}'
  return f'{days}d {clock}' if days else clock


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of steps that run one compiled step function (pre-training, adversarial).

  end: the phase's last step (steps counted from 1, as ProgressLogger.update counts them).
  step_cost: its time per step relative to the other phases' step_cost, and compile_cost
  the time of its first (compiling) step beyond an ordinary step, likewise relative: the
  ETA's estimate for a phase until its own steps are timed (ProgressLogger).
  """
  name: str
  end: int
  step_cost: float = 1.0
  compile_cost: float = 1.0


class ProgressLogger:
  """Logs 'step s/N (p%) | r steps/s | ETA | elapsed | metrics' every `every` steps.

  Also at the end of each phase. The rate is that of the steps timed since the last line.
  A phase's first step in this process compiles; a caller that brackets it with
  `compiling` (which logs 'compiling the <phase> step ...') and `compiled` keeps it out of
  the rate and the ETA, as `paused` keeps other work between steps. The ETA adds, per
  phase, the steps left times the phase's time per step since its last line. A phase not
  timed yet is estimated from the phase timed last, scaled by their Phase.step_cost; a
  phase not started yet also gets a compiling first step, estimated from the last one
  measured (its time beyond an ordinary step), scaled by their Phase.compile_cost.
  """

  def __init__(self, total_steps: int, every: int, *, start_step: int = 0,
               phases: Sequence[Phase] | None = None,
               enabled: bool = True,
               clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] = logging.info):
    """Starts the clock; `start_step` is where a resumed run begins.

    phases: in order, the last one ending at total_steps (default: one phase of them all).
    """
    self.total_steps = int(total_steps)
    self.every = int(every)
    self.enabled = enabled
    self._clock = clock
    self._log = log
    kept: list[Phase] = []
    for p in phases or ():
      if p.step_cost <= 0 or p.compile_cost <= 0:
        raise ValueError(f'phase {p.name!r}: the costs must be positive')
      last = kept[-1].end if kept else 0
      if p.end < last:
        raise ValueError(f'phase {p.name!r} ends at step {p.end}, before the phase ahead')
      if p.end > last:  # an empty phase has no step to time
        kept.append(p)
    self._phases = kept or [Phase('training', self.total_steps)]
    if self._phases[-1].end != self.total_steps:
      raise ValueError(f'the last phase ends at step {self._phases[-1].end}, not at '
                       f'total_steps {self.total_steps}')
    self._starts = [0] + [p.end for p in self._phases[:-1]]
    self._start_time = clock()
    # The timed stretch in progress begins at (step, time); None while a step compiles.
    self._mark: tuple[int, float] | None = (int(start_step), self._start_time)
    self._compiling: tuple[int, float] | None = None
    self._line_steps, self._line_seconds = 0, 0.0  # timed since the last line
    self._step_seconds: dict[int, float] = {}    # phase -> seconds per step, last stretch
    self._first_seconds: dict[int, float] = {}   # phase -> seconds of its compiling step
    self._timed: list[int] = []                  # phases in the order last timed
    self._first_timed: list[int] = []
    # Steps per second of the last line (NaN when it timed none: a compiling step alone).
    self.rate = float('nan')

  def _phase(self, step: int) -> int:
    """The index of the phase that step `step` (counted from 1) belongs to."""
    for i, p in enumerate(self._phases):
      if step <= p.end:
        return i
    return len(self._phases) - 1

  def _close(self, step: int, now: float) -> None:
    """Ends the timed stretch at `step`, now; a new one starts there."""
    if self._mark is not None and step > self._mark[0]:
      first, seconds = self._mark[0], now - self._mark[1]
      counts = {i: min(step, p.end) - max(first, s)
                for i, (p, s) in enumerate(zip(self._phases, self._starts))}
      counts = {i: n for i, n in counts.items() if n > 0}
      # A stretch over several phases (a caller that logs no phase end) is shared by cost.
      unit = seconds / sum(n * self._phases[i].step_cost for i, n in counts.items())
      for i in counts:
        self._step_seconds[i] = unit * self._phases[i].step_cost
        self._timed = [j for j in self._timed if j != i] + [i]
      self._line_steps += step - first
      self._line_seconds += seconds
    self._mark = (step, now)

  def _step_estimate(self, i: int) -> float:
    """Seconds per step of phase i: timed, else scaled from the phase timed last (or NaN)."""
    if i in self._step_seconds:
      return self._step_seconds[i]
    if not self._timed:
      return float('nan')
    j = self._timed[-1]
    return self._step_seconds[j] * self._phases[i].step_cost / self._phases[j].step_cost

  def eta(self, step: int) -> float:
    """Estimated seconds until total_steps, `step` steps done (NaN before any timing)."""
    seconds = 0.0
    for i, (p, s) in enumerate(zip(self._phases, self._starts)):
      left = p.end - max(step, s)
      if left <= 0:
        continue
      seconds += left * self._step_estimate(i)
      if step <= s and self._first_timed:  # not started: its first step compiles
        j = self._first_timed[-1]
        extra = max(0.0, self._first_seconds[j] - self._step_estimate(j))
        seconds += extra * p.compile_cost / self._phases[j].compile_cost
    return seconds

  def compiling(self, step: int) -> str | None:
    """Logs that step `step` + 1, a phase's first in this process, compiles; stops the clock."""
    if not self.enabled or step >= self.total_steps:
      return None
    now = self._clock()
    self._close(step, now)
    self._mark, self._compiling = None, (step, now)
    line = f'compiling the {self._phases[self._phase(step + 1)].name} step ...'
    self._log(line)
    return line

  def compiled(self, step: int) -> None:
    """Restarts the clock after the compiling step, `step`, has run (its result is ready)."""
    if not self.enabled or self._compiling is None:
      return
    now = self._clock()
    i = self._phase(step)
    self._first_seconds[i] = now - self._compiling[1]
    self._first_timed = [j for j in self._first_timed if j != i] + [i]
    self._mark, self._compiling = (step, now), None

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Leaves the time spent in the block (writing figures, say) out of the rate and ETA."""
    start = self._clock() if self.enabled else 0.0
    try:
      yield
    finally:
      if self.enabled and self._mark is not None:
        self._mark = (self._mark[0], self._mark[1] + self._clock() - start)

  def update(self, step: int, metrics: Mapping[str, Any] | None = None, *,
             force: bool = False) -> str | None:
    """Logs and returns the progress line if `step` is due (every, a phase end, the last).

    force: also off the interval (the last line of a run that stops early).
    """
    step = int(step)
    if not self.enabled or self.every <= 0:
      return None
    if not force and step % self.every and all(step != p.end for p in self._phases):
      return None
    now = self._clock()
    self._close(step, now)
    steps, seconds = self._line_steps, self._line_seconds
    rate = steps / seconds if steps > 0 and seconds > 0 else float('nan')
    self.rate = rate
    self._line_steps, self._line_seconds = 0, 0.0
    percent = 100.0 * step / self.total_steps if self.total_steps else 100.0
    rate_text = f'{rate:.2f}' if math.isfinite(rate) else '?'
    parts = [f'step {step}/{self.total_steps} ({percent:.1f}%)',
             f'{rate_text} steps/s',
             f'ETA {format_duration(self.eta(step))}',
             f'elapsed {format_duration(now - self._start_time)}']
    if metrics:
      parts.append(' '.join(f'{k} {_scalar(k, v):.4g}' for k, v in metrics.items()))
    line = ' | '.join(parts)
    self._log(line)
    return line


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO records from chatty libraries (orbax logs every save step by step)."""

  def __init__(self, fragments: tuple[str, ...]):
    super().__init__()
    self._fragments = fragments

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(f in record.pathname for f in self._fragments)


def quiet_library_logs(fragments: tuple[str, ...] = ('/orbax/',)) -> None:
  """Keeps absl INFO logging for this project while silencing libraries' INFO chatter."""
  # JAX's "Unable to initialize backend 'tpu'" on every machine without one (a Python
  # logger of its own, which absl's filter below does not see).
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropLibraryInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropLibraryInfo(fragments))
