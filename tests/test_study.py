"""The study command end to end on the tiny 'test' budget, and the report's arithmetic."""

import contextlib
import errno
import gzip
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from avae_jax import api
from avae_jax import data
from avae_jax import files
from avae_jax import xla_flags
from avae_jax import study_report
from configs import study as study_config
from tests import processes
from tests import test_api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = '/usr/share/datasets/fashion-mnist'
VARIANT_COLUMNS = ('VAE', 'AVAE', 'VAE-S', 'AVAE-S')


def _start_study(*args, cwd=REPO, **env):
  """`python study.py ARGS` in the background, text pipes; `env`: extra variables."""
  return subprocess.Popen([sys.executable, os.path.join(REPO, 'study.py'), *args], cwd=cwd,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, check=True, timeout=900):
  """Waits for a study.py process; its CompletedProcess (AssertionError on failure if `check`)."""
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  if check and proc.returncode != 0:
    raise AssertionError(f'study.py {proc.args[2:]} failed ({proc.returncode}):\n'
                         f'{stdout[-3000:]}\n{stderr[-5000:]}')
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _study(*args, check=True):
  return _finish(_start_study(*args), check)


def _read(path):
  with open(path) as f:
    return f.read()


def _table_rows(text, heading):
  """The rows (lists of cells) of the first markdown table after `heading`."""
  start = text.index(heading)
  rows = []
  for line in text[start:].splitlines()[1:]:
    if line.startswith('|'):
      rows.append([c.strip() for c in line.strip().strip('|').split('|')])
    elif rows:
      break
  return rows


def _is_number(cell):
  """'0.123', '1.2e-05' or '0.12 ± 0.01'."""
  return re.fullmatch(r'-?[0-9.]+(e[-+][0-9]+)?( ± [0-9.]+(e[-+][0-9]+)?)?', cell) is not None


def test_a_bucket_as_out_is_a_usage_error():
  proc = _study('--out=gs://bucket/study', '--budget=test', check=False)
  assert proc.returncode == 1
  assert '--out=gs://bucket/study: the study needs a local directory' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_an_out_that_is_a_file_is_a_usage_error(tmp_path):
  # A FileExistsError traceback from os.makedirs.
  (tmp_path / 'out').write_text('not a directory')
  proc = _study(f'--out={tmp_path / "out"}', '--budget=test', check=False)
  assert proc.returncode == 1
  assert f'the study directory (--out) {tmp_path / "out"} is a file, not a directory' in \
      proc.stderr
  assert 'Traceback' not in proc.stderr


def test_a_publish_dir_that_is_a_file_is_a_usage_error_before_the_study(tmp_path):
  # A FileExistsError traceback when the study had finished and its report was published.
  (tmp_path / 'docs').write_text('not a directory')
  proc = _study(f'--out={tmp_path / "out"}', '--budget=test', '--publish',
                f'--publish_dir={tmp_path / "docs"}', check=False)
  assert proc.returncode == 1
  assert f'the --publish_dir {tmp_path / "docs"} is a file, not a directory' in proc.stderr
  assert 'Traceback' not in proc.stderr and not os.listdir(tmp_path / 'out')


@pytest.mark.parametrize('out', ['docs/results/runs', 'docs'])
def test_an_out_that_publishing_would_replace_is_a_usage_error(tmp_path, out):
  # Publishing deletes DOCS/results before copying OUT/results there: a report remade from
  # the published records lost them, and ended with a FileNotFoundError traceback.
  out = tmp_path / out
  out.mkdir(parents=True)
  (out / study_report.STUDY_FILE).write_text('{}')
  proc = _study(f'--out={out}', '--budget=test', '--report_only', '--publish',
                f'--publish_dir={tmp_path / "docs"}', check=False)
  assert proc.returncode == 1
  where = ('the --publish_dir' if out == tmp_path / 'docs'
           else f'in {tmp_path / "docs" / "results"}')
  assert (f'--out={out} is {where}, which publishing replaces with the report\'s figures and '
          'records') in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert os.listdir(out) == [study_report.STUDY_FILE]


def test_a_negative_max_hours_is_a_usage_error(tmp_path):
  proc = _study(f'--out={tmp_path}', '--budget=test', '--max_hours=-1', check=False)
  assert proc.returncode == 1
  assert '--max_hours=-1: must be >= 0 (0: no limit)' in proc.stderr
  assert 'Traceback' not in proc.stderr and not os.listdir(tmp_path)


def test_a_missing_notes_file_is_a_usage_error(tmp_path):
  # It would leave the discussion out of the report without a word.
  proc = _study(f'--out={tmp_path}', '--budget=test', '--report_only',
                f'--notes={tmp_path / "discusion.md"}', check=False)
  assert proc.returncode == 1
  assert f'--notes={tmp_path / "discusion.md"}: no such file' in proc.stderr
  assert 'Traceback' not in proc.stderr and not os.listdir(tmp_path)


def test_publishing_without_notes_keeps_the_published_discussion(tmp_path):
  out, docs = tmp_path / 'out', tmp_path / 'docs'
  (out / 'results').mkdir(parents=True)
  (out / 'results.md').write_text('the new report\n')
  (out / 'results' / 'new.png').write_bytes(b'new figure')
  (docs / 'results').mkdir(parents=True)
  (docs / 'results' / 'old.png').write_bytes(b'old figure')
  (docs / 'results' / 'discussion.md').write_text('the discussion written before\n')
  study_report.publish(str(out), str(docs))
  assert sorted(os.listdir(docs / 'results')) == ['discussion.md', 'new.png']
  assert (docs / 'results' / 'discussion.md').read_text() == 'the discussion written before\n'
  assert (docs / 'results.md').read_text() == 'the new report\n'
  # Notes given replace it.
  (tmp_path / 'notes.md').write_text('a new discussion\n')
  study_report.publish(str(out), str(docs), notes_path=str(tmp_path / 'notes.md'))
  assert (docs / 'results' / 'discussion.md').read_text() == 'a new discussion\n'


def test_publish_refuses_to_replace_its_own_input(tmp_path):
  # Called from Python too (not only after study.py's flag check): DOCS/results is deleted
  # before OUT/results is copied there, so OUT inside it would lose its records.
  docs = tmp_path / 'docs'
  for out in (docs, docs / 'results' / 'runs'):
    (out / 'results').mkdir(parents=True, exist_ok=True)
    (out / 'results.md').write_text('the report\n')
    with pytest.raises(ValueError, match='which publishing replaces'):
      study_report.publish(str(out), str(docs))
    assert (out / 'results.md').read_text() == 'the report\n'


def test_an_empty_out_is_a_usage_error(tmp_path):
  # abspath('') is the working directory: the study went into wherever it was started.
  proc = _finish(_start_study('--out=', '--budget=test', '--datasets=shapes', '--variants=vae',
                              '--max_hours=1e-12', '--publish=false', cwd=str(tmp_path)),
                 check=False)
  assert proc.returncode == 1
  assert '--out is empty' in proc.stderr and 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)


@pytest.fixture(scope='module')
def study_dir(tmp_path_factory):
  """One tiny study of both datasets, all four models, one seed (run once per module).

  As the README runs a study on two cores: two study.py processes on the same OUT at
  once (here one per dataset), then --report_only (this also halves the fixture's time).
  """
  if not os.path.isdir(FMNIST):
    pytest.skip(f'{FMNIST} missing: apt-get install dataset-fashion-mnist')
  out = str(tmp_path_factory.mktemp('study'))
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  procs = [_start_study(f'--out={out}', '--budget=test', f'--datasets={ds}',
                        JAX_COMPILATION_CACHE_DIR=cache) for ds in ('shapes', 'fashion_mnist')]
  try:
    for proc in procs:
      stdout = _finish(proc).stdout
      assert '4/4 runs finished' in stdout, stdout[-3000:]
    # The user's compilation cache is used instead of OUT's own.
    assert os.listdir(cache) and not os.path.exists(os.path.join(out, '.jax_cache'))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return out, _study(f'--out={out}', '--budget=test', '--report_only')


def test_report_has_every_table(study_dir):
  out, _ = study_dir
  text = _read(os.path.join(out, 'results.md'))
  assert '8 of 8 runs finished (2 dataset(s) × 4 models × 1 seed(s))' in text
  # The test budget's sizes, not the cpu budget's 32×32.
  assert '\n## shapes (procedural, 16×16 RGB)\n' in text
  assert '\n## Fashion-MNIST (Debian dataset-fashion-mnist, 28×28)\n' in text
  # What each run recorded (the same count for all: one machine, the tests' devices).
  threads = xla_flags.cpu_threads(jax.local_device_count())
  assert f'\nXLA:CPU thread counts of the runs: {threads} (' in text
  # The first line names the two processes' commands and the one that wrote the report.
  first = text.splitlines()[2]
  assert first.startswith('Runs by `python study.py --out=')
  for ds in ('shapes', 'fashion_mnist'):
    assert f'--budget=test --datasets={ds}`' in first
  assert re.search(r'this report by `python study\.py --out=\S+ --budget=test '
                   r'--report_only` \(budget `test`', first), first
  # The last line reruns the whole study: its budget, seed count and datasets.
  assert text.rstrip().splitlines()[-1].startswith(
      'Rerun: `python study.py --out=DIR --budget=test --seeds=1 '
      '--datasets=shapes,fashion_mnist`; rerunning')
  # The pairing of the models' seeds, as the claims use it.
  assert "AVAE seed k is VAE seed k fine-tuned; VAE-S seed k shares VAE seed k's" in text
  # Every defect check could be made (at this budget posterior collapse fires).
  assert '**Defect checks' in text and 'not made' not in text
  for ds, has_mig in (('shapes', True), ('fashion_mnist', False)):
    rows = _table_rows(text, f'### Table III on {ds}')
    assert rows[0] == ['Metric', 'Ground Truth', *VARIANT_COLUMNS]
    by_label = {r[0]: r for r in rows[2:]}
    numeric = ['Sharpness (Laplace) of reconstructions', 'Cosine similarity',
               'Mean Squared Error', 'Sharpness (Laplace) of random samples',
               'KL to the prior (nats, summed over latent dims)']
    if has_mig:
      numeric.append('MIG (posterior means vs the 6 ground-truth factors)')
    for label in numeric:
      assert all(_is_number(c) for c in by_label[label][2:]), by_label[label]
    assert _is_number(by_label['Sharpness (Laplace) of reconstructions'][1])
    for d in (64, 192, 768, 2048):
      for what in ('reconstructions', 'random samples'):
        label = [k for k in by_label if f'(d={d}), {what}' in k]
        assert len(label) == 1
        # FID is off in the test budget: the row is there and says so.
        assert by_label[label[0]][2:] == ['skipped'] * 4
    assert any(k.startswith('MIG') for k in by_label) == has_mig
    claims = _table_rows(text, f"### The paper's orderings on {ds}")
    texts = [r[0] for r in claims[2:]]
    assert 'VAE-S reconstructions sharper than VAE (the compound loss sharpens)' in texts
    assert 'AVAE-S MSE equal or lower than VAE-S' in texts
    assert any('MIG' in t for t in texts) == has_mig
    gating = _table_rows(text, f'### Checks before believing a failed claim ({ds})')
    assert [r[0] for r in gating[2:]] == ['AVAE', 'AVAE-S']
    # Every adversarial step updated D, the VAE or both (with the thresholds 0.7 > 0.5
    # every accuracy passes one of them): the two rates add up to at least 100%.
    for r in gating[2:]:
      assert r[2] == '4'
      rates = [float(cell.rstrip('%')) for cell in r[3:5]]
      assert all(0 <= x <= 100 for x in rates) and sum(rates) >= 100
  # The λ table: both datasets, five λ's, λ_mse = 1.
  lam = _table_rows(text, "## λ's and their calibration")
  assert [r[0] for r in lam[2:]] == ['shapes', 'fashion_mnist']
  for r in lam[2:]:
    assert r[3] == '1' and all(_is_number(c) for c in r[2:])
  # Probed once per dataset, from seed 0's initial model, for every seed's runs.
  for ds in ('shapes', 'fashion_mnist'):
    assert json.loads(_read(os.path.join(out, ds, 'calibration.json')))['seed'] == 0
  # Each adversarial model's pre-training is its base model's, on both datasets.
  for pair in ('AVAE vs VAE', 'AVAE-S vs VAE-S'):
    assert text.count(f'{pair} seed 0: identical logs') == 2, pair
  assert 'max |Δ|' not in text


def test_posterior_statistics_are_those_of_the_evaluation_images(study_dir, tmp_path):
  out, _ = study_dir
  workdir = study_report.run_dir(out, 'shapes', 'vae', 0)
  with open(os.path.join(workdir, study_report.POSTERIOR_FILE)) as f:
    got = json.load(f)  # written by the report
  # The first eval.num_images evaluation images, encoded here in one batch.
  model = api.TrainedModel.load(workdir)
  source = data.load(model.config, 'eval')
  n = min(int(model.config.eval.num_images), len(source))
  mu, logvar = (np.asarray(a, np.float64) for a in model.encode(source.get(np.arange(n))))
  # KL(N(mu, e^logvar) || N(0, 1)) per dimension, averaged over the images.
  kl = (-0.5 * (1.0 + logvar - mu ** 2 - np.exp(logvar))).mean(axis=0)
  var_mu = ((mu - mu.mean(axis=0)) ** 2).mean(axis=0)
  assert (got['num_images'], got['latent_dim']) == (n, int(model.config.model.latent_dim))
  np.testing.assert_allclose(got['kl_per_dim'], kl, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got['var_mu'], var_mu, rtol=1e-5, atol=1e-9)
  assert got['active'] == int(np.sum(var_mu > 0.01))  # Burda et al.'s threshold
  # eval.num_images 0 is all of the split, as the evaluation reads it: the report made
  # no check there ('eval.num_images is 0').
  copy = tmp_path / 'seed0'
  shutil.copytree(workdir, copy)
  os.remove(copy / study_report.POSTERIOR_FILE)
  config = json.loads((copy / 'config.json').read_text())
  config['eval']['num_images'] = 0
  (copy / 'config.json').write_text(json.dumps(config))
  run = study_report.Run('shapes', 'vae', 0, str(copy), metrics={}, config=config,
                         history=[], info={})
  assert study_report.posterior_stats(run)['num_images'] == len(source)


def test_report_has_every_figure(study_dir):
  out, _ = study_dir
  text = _read(os.path.join(out, 'results.md'))
  from PIL import Image
  for ds in ('shapes', 'fashion_mnist'):
    for v in ('vae', 'avae', 'vae_s', 'avae_s'):
      for fig in ('reconstructions', 'samples', 'interpolations', 'traversals'):
        rel = f'results/{ds}/{v}_{fig}.png'
        assert f']({rel})' in text
        with Image.open(os.path.join(out, rel)) as im:
          assert im.size[0] > 8 and im.size[1] > 8
    for curves in ('training_losses', 'training_adversarial'):
      rel = f'results/{ds}/{curves}.png'
      assert f']({rel})' in text
      with Image.open(os.path.join(out, rel)) as im:
        assert im.size[0] > 200


def test_the_reports_records_remake_its_numbers(study_dir, tmp_path):
  out, _ = study_dir
  records = os.path.join(out, 'results', 'runs')
  names = {os.path.relpath(os.path.join(d, f), records)
           for d, _, fs in os.walk(records) for f in fs}
  run_files = {'config.json', 'final_metrics.json', 'metrics.jsonl', 'study_run.json',
               'study_posterior.json'}
  expected = {'study.json', 'shapes/calibration.json', 'fashion_mnist/calibration.json'} | {
      f'{ds}/{v}/seed0/{f}' for ds in ('shapes', 'fashion_mnist')
      for v in ('vae', 'avae', 'vae_s', 'avae_s') for f in run_files}
  assert names == expected  # the records only: no checkpoint, event file or image
  for name in expected:
    assert _read(os.path.join(records, name)) == _read(os.path.join(out, name)), name
  # A report made from a copy of the records alone is the same report, but for the line
  # that names the report's command and the figures, which the records leave out.
  copy = tmp_path / 'copy'
  shutil.copytree(records, copy)
  _study(f'--out={copy}', '--budget=test', '--report_only')

  def lines(text):
    kept = text.splitlines()
    del kept[2]  # 'Runs by ...; this report by `python study.py --out=...`'
    return [line for line in kept
            if not line.startswith(tuple(f'| {name} |' for name in study_report.FIGURES))]

  original, remade = (lines(_read(os.path.join(d, 'results.md'))) for d in (out, copy))
  assert len(original) > 300 and remade == original


def test_rerun_skips_finished_and_resumes_unfinished(study_dir, tmp_path):
  out, _ = study_dir
  victim = os.path.join(out, 'shapes', 'avae', 'seed0')
  os.remove(os.path.join(victim, 'final_metrics.json'))
  # As if its first session had failed: the traceback goes once the run is done.
  info_path = os.path.join(victim, 'study_run.json')
  info = json.loads(_read(info_path))
  info.update(status='failed: OSError: a disk error', error='Traceback ...')
  with open(info_path, 'w') as f:
    json.dump(info, f)
  docs = tmp_path / 'docs'
  (docs / 'results').mkdir(parents=True)
  (docs / 'results' / 'discussion.md').write_text('written for the study published before\n')
  proc = _study(f'--out={out}', '--budget=test', '--datasets=shapes', '--publish',
                f'--publish_dir={docs}')
  trained = re.findall(r'\[study\] (\S+ \S+ seed \d+): training', proc.stdout)
  assert trained == ['shapes avae seed 0']
  assert 'resuming from checkpoint' in proc.stdout
  assert os.path.exists(os.path.join(victim, 'final_metrics.json'))
  info = json.loads(_read(os.path.join(victim, 'study_run.json')))
  assert info['sessions'] == 2 and info['status'] == 'done' and 'error' not in info
  # Published: the report and its figures, with the same relative links.
  assert (docs / 'results.md').exists()
  assert (docs / 'results' / 'shapes' / 'avae_s_traversals.png').exists()
  # With the records it was made of, the resumed run's new final metrics among them.
  assert ((docs / 'results' / 'runs' / 'shapes' / 'avae' / 'seed0' / 'final_metrics.json')
          .read_text() == _read(os.path.join(victim, 'final_metrics.json')))
  # Without --notes the discussion published before stays, and the log says so.
  assert ((docs / 'results' / 'discussion.md').read_text()
          == 'written for the study published before\n')
  assert f'kept {docs / "results" / "discussion.md"}, the discussion' in proc.stderr


def test_a_report_waits_while_another_process_writes_one(study_dir):
  out, _ = study_dir
  report = os.path.join(out, 'results.md')
  before = os.stat(report).st_mtime_ns
  # What a study.py process holds while writing study.json or the report (its REPORT_LOCK).
  with files.exclusive(out, 'the test', lock_file='report.lock'):
    proc = _start_study(f'--out={out}', '--budget=test', '--report_only')
    try:
      processes.wait_until_blocked_on_a_lock(proc.pid, alive=lambda: proc.poll() is None)
      assert os.stat(report).st_mtime_ns == before
    except BaseException:
      proc.kill()
      proc.communicate()
      raise
  result = _finish(proc, timeout=300)
  assert '[study] wrote' in result.stdout
  assert f'{out} is in use by the test (pid {os.getpid()} ' in result.stderr
  assert os.stat(report).st_mtime_ns > before


def test_refuses_a_directory_of_another_budget(study_dir):
  out, _ = study_dir
  proc = _study(f'--out={out}', '--budget=cpu', '--report_only', '--nopublish', check=False)
  assert proc.returncode != 0
  assert 'another budget' in proc.stderr + proc.stdout


def test_only_the_whole_study_is_published_by_default(tmp_path):
  # One process of a split study published its half over the checkout's report.
  docs = tmp_path / 'docs'
  (docs / 'results').mkdir(parents=True)
  (docs / 'results.md').write_text('the published study\n')
  proc = _study(f'--out={tmp_path / "study"}', '--budget=cpu', '--datasets=shapes',
                '--variants=vae', '--max_hours=1e-12', f'--publish_dir={docs}')
  assert ('not published (the study of --datasets=shapes and --variants=vae only)'
          in proc.stderr)
  assert (docs / 'results.md').read_text() == 'the published study\n'
  import study  # pylint: disable=g-import-not-at-top
  settings = study_config.get_config('cpu')
  total = 2 * 4 * int(settings.seeds)
  assert study._partial(settings, total, total) == ''
  assert study._partial(settings, total - 2, total) == (
      f'2 of its {total} runs have not finished')
  settings.variants = 'vae,avae'
  assert study._partial(settings, total, total) == 'the study of --variants=vae,avae only'


def test_a_study_of_fewer_seeds_than_its_budget_is_not_published_by_default():
  import study  # pylint: disable=g-import-not-at-top
  settings = study_config.get_config('cpu')
  assert settings.seeds == 3
  settings.seeds = 1  # every run of `study.py --seeds=1` finished
  assert study._partial(settings, 8, 8) == 'the study of --seeds=1 only'
  settings.seeds = 5  # more seeds than the budget's is still the whole study
  assert study._partial(settings, 40, 40) == ''


def test_report_only_needs_an_existing_study(tmp_path):
  out = tmp_path / 'typo'
  proc = _study(f'--out={out}', '--budget=test', '--report_only', '--publish',
                f'--publish_dir={tmp_path / "docs"}', check=False)
  assert proc.returncode == 1
  assert 'holds no study (no study.json)' in proc.stderr
  assert not out.exists() and not (tmp_path / 'docs').exists()


def test_a_study_with_no_finished_run_is_not_published(tmp_path):
  docs = tmp_path / 'docs'
  (docs / 'results').mkdir(parents=True)
  (docs / 'results.md').write_text('the published study\n')
  # --max_hours is over before the first run starts, so it is skipped, not trained.
  proc = _study(f'--out={tmp_path / "study"}', '--budget=test', '--datasets=shapes',
                '--variants=vae', '--max_hours=1e-12', '--publish', f'--publish_dir={docs}')
  assert '0/1 runs finished' in proc.stdout
  assert 'not published: no run has finished' in proc.stderr
  assert (docs / 'results.md').read_text() == 'the published study\n'
  assert (tmp_path / 'study' / 'results.md').exists()


# ------------------------------------------------------------------------ arithmetic


def _run(variant, seed, **metrics):
  return study_report.Run('shapes', variant, seed, '', metrics, {}, [], {})


def test_mean_sd_matches_statistics():
  values = [0.3, 0.1, 0.7, None, float('nan')]
  m, s, n = study_report.mean_sd(values)
  assert n == 3
  assert m == pytest.approx(statistics.mean([0.3, 0.1, 0.7]))
  assert s == pytest.approx(statistics.stdev([0.3, 0.1, 0.7]))
  assert study_report.mean_sd([2.0]) == (2.0, 0.0, 1)


def test_table_iii_cells_over_fewer_seeds_than_finished_say_so():
  runs = [_run('vae', 0, rec_mse=0.1), _run('vae', 1, rec_mse=0.3),
          _run('vae', 2, rec_mse=float('nan')),
          _run('avae', 0, rec_mse=0.2), _run('avae', 1), _run('avae', 2, rec_mse=0.4)]
  runs += [_run('vae_s', s, rec_mse=v) for s, v in enumerate((0.5, float('inf')))]
  lines = study_report.table_iii(runs, 'shapes', ['vae', 'avae', 'vae_s']).splitlines()
  assert lines[0] == '| Metric | Ground Truth | VAE | AVAE | VAE-S |'
  row = [line for line in lines if line.startswith('| Mean Squared Error')][0]
  sd_vae = f'{statistics.stdev([0.1, 0.3]):.2g}'
  sd_avae = f'{statistics.stdev([0.2, 0.4]):.2g}'
  assert row == (f'| Mean Squared Error | 0 | 0.2 ± {sd_vae} (n=2) | 0.3 ± {sd_avae} (n=2) | '
                 '0.5 (n=1) |')
  row = [line for line in lines if line.startswith('| KL to the prior')][0]
  assert row.endswith('| - | - | - |')


def test_table_iii_counts_finished_runs_only_and_shows_fid_any_run_has():
  """An unfinished run is not a seed a cell is short of: no '(n=...)' for it. A run
  whose metrics lack FID leaves the FID rows to the runs that have them (not 'skipped')."""
  unfinished = study_report.Run('shapes', 'vae', 2, '', None, {}, [], {})
  fid = {f'fid_rec_{d}': 5.0 for d in study_report.TAPS}
  runs = [_run('vae', 0, rec_mse=0.1, **fid), _run('vae', 1, rec_mse=0.3), unfinished]
  lines = study_report.table_iii(runs, 'shapes', ['vae']).splitlines()
  [row] = [l for l in lines if l.startswith('| Mean Squared Error')]
  assert row == f'| Mean Squared Error | 0 | 0.2 ± {statistics.stdev([0.1, 0.3]):.2g} |'
  [row] = [l for l in lines if l.startswith('| FID') and '2048' in l and 'reconstr' in l]
  assert row.endswith('| - | 5 (n=1) |'), row


def test_claims_point_the_way_the_paper_means():
  # Sharper, more similar and more disentangled is better; error and distance are worse.
  better = {'rec_sharpness_mean': 'higher', 'sample_sharpness_mean': 'higher',
            'rec_cosine_similarity': 'higher', 'mig': 'higher', 'rec_mse': 'lower'}
  claims = study_report.claims()
  for claim in claims:
    expected = 'lower' if claim.key.startswith('fid_') else better[claim.key]
    assert claim.better == expected, claim
  assert {c.key for c in claims} >= set(better) | {'fid_rec_2048', 'fid_sample_2048'}
  # The text's "improved the FID in all cases": the reconstructions' at the three other
  # layers too (d = 2048's are the pairs' rows).
  assert {c.key for c in claims if c.a == 'avae_s' and c.b == 'vae'} == {
      f'fid_rec_{d}' for d in (64, 192, 768)}
  # Only the paper's "equal or" orderings (Table III's MSE and cosine similarity) let a
  # difference within EQUAL_TOLERANCE count as holding.
  for claim in claims:
    assert claim.or_equal == (' equal or ' in claim.text), claim
  assert sum(c.or_equal for c in claims) == 6
  # MIG needs ground-truth factors: its claims are made on shapes only.
  table, results = study_report.claims_table([], 'fashion_mnist')
  assert 'MIG' not in table and len(results) == len(claims) - 2
  assert [c.key for c, _ in study_report.claims_table([], 'shapes')[1]].count('mig') == 2


def test_the_papers_relative_change_is_a_over_b():
  # Table III's MSE: VAE-S 0.009412 against VAE 0.010207, 7.8% lower.
  runs = [_run('vae_s', 0, rec_mse=0.02), _run('vae', 0, rec_mse=0.01)]
  table, _ = study_report.claims_table(runs, 'shapes')
  [row] = [l for l in table.splitlines() if l.startswith('| VAE-S MSE equal or lower than VAE')]
  assert row.split('|')[2].strip() == f'{100 * (0.009412 / 0.010207 - 1):+.1f}%' == '-7.8%'
  assert row.split('|')[5].strip() == '+100.0%'  # this study's: 0.02 against 0.01


def test_table_iii_rows_read_their_own_metrics():
  # Every metric a distinct value, so a row that read another metric shows it.
  keys = ('rec_sharpness_mean', 'rec_sharpness_std', 'sample_sharpness_mean',
          'sample_sharpness_std', 'rec_mse', 'rec_cosine_similarity', 'gt_sharpness_mean',
          'gt_sharpness_std')
  runs = [_run('vae', s, **{k: (i + 1) * 10.0 + s for i, k in enumerate(keys)})
          for s in range(2)]
  lines = study_report.table_iii(runs, 'shapes', ['vae']).splitlines()

  def cell(label):
    [row] = [l for l in lines if l.startswith(f'| {label} |')]
    return row.split('|')[3].strip()
  for label, k in (('Sharpness (Laplace) of reconstructions', 'rec_sharpness_mean'),
                   ('Sharpness (Laplace) of random samples', 'sample_sharpness_mean'),
                   ('Mean Squared Error', 'rec_mse'),
                   ('Cosine similarity', 'rec_cosine_similarity')):
    values = [(keys.index(k) + 1) * 10.0 + s for s in range(2)]
    sd = statistics.stdev(values)
    assert cell(label) == f'{statistics.mean(values):.4g} ± {sd:.2g}', (label, cell(label))


def test_check_claim_pairs_seeds():
  # higher is better: differences a - b per seed = +1, +1, -1 (seed 3 has no partner).
  runs = [_run('vae_s', 0, x=1.0), _run('vae_s', 1, x=2.0), _run('vae_s', 2, x=3.0),
          _run('vae', 0, x=0.0), _run('vae', 1, x=1.0), _run('vae', 2, x=4.0),
          _run('vae_s', 3, x=9.0)]
  claim = study_report.Claim('t', 'x', 'higher', 'vae_s', 'vae')
  r = study_report.check_claim(runs, 'shapes', claim)
  assert r['n'] == 3 and r['wins'] == 2
  assert r['diff_mean'] == pytest.approx(1 / 3)
  assert r['diff_sd'] == pytest.approx(statistics.stdev([1.0, 1.0, -1.0]))
  assert r['rel'] == pytest.approx(2.0 / (5 / 3) - 1)
  assert r['verdict'] == 'mixed: 2/3 seeds hold, the mean holds'
  # The findings' ± says what it is: the sd of the per-seed differences (1, 1, -1).
  assert 'paired Δ = 0.333 ± 1.2 (sd) over 3 seed(s).' in study_report._claim_sentence(claim, r)
  lower = study_report.Claim('t', 'x', 'lower', 'vae_s', 'vae')
  r = study_report.check_claim(runs, 'shapes', lower)
  assert r['verdict'] == 'mixed: 1/3 seeds hold, the mean does not'
  # The paired difference is a - b whichever way is better (the table's "Δ (a − b)").
  assert r['diff_mean'] == pytest.approx(1 / 3) and r['wins'] == 1
  # A seed with equal values is no win, and the seeds' mean (not their median) is the
  # mixed verdict's: differences +1, +1, -5.
  runs = [_run('vae_s', s, x=v) for s, v in enumerate((1.0, 2.0, 3.0))]
  runs += [_run('vae', s, x=v) for s, v in enumerate((1.0, 1.0, 2.0))]
  r = study_report.check_claim(runs, 'shapes', claim)
  assert r['wins'] == 2 and r['verdict'] == 'mixed: 2/3 seeds hold, the mean holds'
  runs = [_run('vae_s', s, x=v) for s, v in enumerate((1.0, 2.0, 0.0))]
  runs += [_run('vae', s, x=v) for s, v in enumerate((0.0, 1.0, 5.0))]
  r = study_report.check_claim(runs, 'shapes', claim)
  assert r['verdict'] == 'mixed: 2/3 seeds hold, the mean does not'
  # "Equal or lower" with a 0.5% increase on every seed counts as equal.
  runs = [_run('avae', s, m=1.005) for s in range(2)] + [_run('vae', s, m=1.0) for s in range(2)]
  eq = study_report.Claim('t', 'm', 'lower', 'avae', 'vae', or_equal=True)
  assert study_report.check_claim(runs, 'shapes', eq)['verdict'].startswith('holds: equal')
  strict = study_report.Claim('t', 'm', 'lower', 'avae', 'vae')
  assert study_report.check_claim(runs, 'shapes', strict)['verdict'] == \
      'does not hold (every seed)'


def test_a_single_seed_shows_no_spread_of_its_paired_difference():
  # One seed's difference has no standard deviation: '± 0' claimed a spread of zero.
  runs = [_run('vae_s', 0, rec_sharpness_mean=0.03), _run('vae', 0, rec_sharpness_mean=0.02)]
  table, results = study_report.claims_table(runs, 'shapes')
  row = [l for l in table.splitlines() if l.startswith('| VAE-S reconstructions sharper')][0]
  assert '| 0.01 (n=1) |' in row and '±' not in row
  claim, r = results[0]
  assert r['n'] == 1 and r['diff_mean'] == pytest.approx(0.01)
  sentence = study_report._claim_sentence(claim, r)
  assert 'paired Δ = 0.01 over 1 seed(s).' in sentence and '±' not in sentence
  # Two seeds: the sample standard deviation of the differences 0.01 and 0.03.
  runs += [_run('vae_s', 1, rec_sharpness_mean=0.05), _run('vae', 1, rec_sharpness_mean=0.02)]
  table, _ = study_report.claims_table(runs, 'shapes')
  sd = statistics.stdev([0.01, 0.03])
  assert f'| 0.02 ± {sd:.2g} (n=2) |' in table


def test_check_claim_skips_nan_and_measures_cosine_from_one():
  # A NaN on seed 1 leaves that seed out instead of counting it as a loss.
  runs = [_run('vae_s', 0, x=2.0), _run('vae_s', 1, x=float('nan')), _run('vae_s', 2, x=3.0),
          _run('vae', 0, x=1.0), _run('vae', 1, x=1.0), _run('vae', 2, x=2.0)]
  r = study_report.check_claim(runs, 'shapes', study_report.Claim('t', 'x', 'higher',
                                                                  'vae_s', 'vae'))
  assert r['n'] == 2 and r['wins'] == 2 and r['verdict'] == 'holds (every seed)'
  # Cosine similarity 0.925 against 0.93 on every seed: 0.5% lower, but 1 - cos is 7%
  # larger, so "equal or higher" does not hold; 0.9297 (1 - cos 0.4% larger) is equal.
  key = 'rec_cosine_similarity'
  claim = study_report.Claim('t', key, 'higher', 'avae', 'vae', or_equal=True)
  for cos, verdict in ((0.925, 'does not hold (every seed)'),
                       (0.9297, 'holds: equal within 1% of the distance to 1')):
    runs = ([_run('avae', s, **{key: cos}) for s in range(3)]
            + [_run('vae', s, **{key: 0.93}) for s in range(3)])
    assert study_report.check_claim(runs, 'shapes', claim)['verdict'] == verdict


def test_claims_compare_each_model_with_the_one_the_paper_does():
  """Each ordering puts the paper's better model first: the compound loss (VAE-S) against
  VAE, fine-tuning (AVAE, AVAE-S) against its base model (VAE, VAE-S), the TC term's MIG
  (VAE-S, AVAE-S) against VAE and AVAE."""
  pairs = {('vae_s', 'vae'), ('avae', 'vae'), ('avae_s', 'vae_s')}
  claims = study_report.claims()
  for key in ('rec_sharpness_mean', 'sample_sharpness_mean', 'rec_mse',
              'rec_cosine_similarity', 'fid_sample_2048', 'fid_rec_2048'):
    assert {(c.a, c.b) for c in claims if c.key == key} == pairs, key
  assert {(c.a, c.b) for c in claims if c.key == 'mig'} == {('vae_s', 'vae'),
                                                             ('avae_s', 'avae')}


def test_check_claim_reports_each_models_mean_and_drops_a_nan_of_b():
  """a_mean is the claim's first model's mean, b_mean its second's; a seed whose second
  model has a NaN is left out of the pairs, as one whose first model has one."""
  runs = [_run('vae_s', 0, x=3.0), _run('vae_s', 1, x=5.0), _run('vae_s', 2, x=7.0),
          _run('vae', 0, x=1.0), _run('vae', 1, x=2.0), _run('vae', 2, x=float('nan'))]
  claim = study_report.Claim('t', 'x', 'higher', 'vae_s', 'vae')
  r = study_report.check_claim(runs, 'shapes', claim)
  # Seeds 0 and 1 only: a = 3, 5 (mean 4), b = 1, 2 (mean 1.5).
  assert r['n'] == 2 and r['wins'] == 2
  assert (r['a_mean'], r['b_mean']) == (4.0, 1.5)
  assert r['diff_mean'] == pytest.approx(2.5)
  table, _ = study_report.claims_table(
      [_run('vae_s', 0, rec_sharpness_mean=3.0), _run('vae', 0, rec_sharpness_mean=1.0)],
      'shapes')
  [row] = [l for l in table.splitlines() if l.startswith('| VAE-S reconstructions sharper')]
  assert row.split('|')[3].strip() == '3 vs 1'


def test_a_mixed_claim_whose_mean_difference_is_zero_does_not_hold_on_the_mean():
  """Seeds disagreeing with differences +1 and -1: the mean (0) does not point the paper's
  way, so the mixed verdict says the mean does not hold."""
  runs = [_run('vae_s', 0, x=2.0), _run('vae_s', 1, x=1.0),
          _run('vae', 0, x=1.0), _run('vae', 1, x=2.0)]
  claim = study_report.Claim('t', 'x', 'higher', 'vae_s', 'vae')
  r = study_report.check_claim(runs, 'shapes', claim)
  assert r['verdict'] == 'mixed: 1/2 seeds hold, the mean does not'


def test_equal_cosine_is_measured_against_the_second_models_distance_to_one():
  """"Equal or higher" cosine: 1 - cos of a is compared relative to 1 - cos of b. Gaps
  0.101005 against 0.1 are 1.005% larger (not equal within 1%), though 0.1 is only
  0.995% below 0.101005."""
  key = 'rec_cosine_similarity'
  claim = study_report.Claim('t', key, 'higher', 'avae', 'vae', or_equal=True)
  runs = ([_run('avae', s, **{key: 1.0 - 0.101005}) for s in range(2)]
          + [_run('vae', s, **{key: 0.9}) for s in range(2)])
  assert study_report.check_claim(runs, 'shapes', claim)['verdict'] == \
      'does not hold (every seed)'


def test_percentages_keep_small_differences_visible():
  assert study_report._signed_pct(0.0004596) == '+0.046%'
  assert study_report._signed_pct(-0.0009) == '-0.09%'
  assert study_report._signed_pct(0.123) == '+12.3%' and study_report._signed_pct(0.0) == '+0.0%'
  assert study_report._signed_pct(0.00456) == '+0.5%'  # from 0.1% on: one decimal
  assert study_report._signed_pct(float('nan')) == '-'


def test_diagnostics_list_the_checks_they_could_not_make(tmp_path):
  # A finished AVAE run whose log has no adversarial step and whose workdir holds no
  # model: neither its gating nor its posterior can be checked, and the report says so.
  run = study_report.Run('shapes', 'avae', 0, str(tmp_path), {'rec_mse': 0.1},
                         {'pretrain_steps': 10}, [{'step': 10, 'loss': 1.0}], {})
  _, warnings, unchecked = study_report._diagnostics([run], 'shapes', ['avae'])
  assert warnings == []
  assert unchecked[0] == 'shapes AVAE seed 0: gating (no adversarial steps logged)'
  assert unchecked[1].startswith('shapes AVAE seed 0: posterior collapse (')


def test_the_figures_traversal_range_is_the_shown_runs():
  def run(variant, seed, traversal_range):
    return study_report.Run('shapes', variant, seed, '', {'rec_mse': 0.1},
                            {'eval': {'traversal_range': traversal_range}}, [], {})

  # Only the runs whose figures are shown count: seed 1's range is not theirs.
  runs = [run('vae', 0, 1.5), run('vae', 1, 3.0), run('avae', 0, 1.5)]
  shown = {'vae': 0, 'avae': 0}
  assert study_report._traversal_words(runs, 'shapes', shown) == 'from −1.5 to 1.5'
  # A shown run whose config.json is missing gives no range (and no error).
  no_config = study_report.Run('shapes', 'vae_s', 0, '', {'rec_mse': 0.1}, None, [], {})
  assert study_report._traversal_words(runs + [no_config], 'shapes',
                                       dict(shown, vae_s=0)) == 'from −1.5 to 1.5'
  assert study_report._traversal_words(runs, 'fashion_mnist', shown) == (
      'from −R to R (R: eval.traversal_range)')
  assert study_report._traversal_words(runs, 'shapes', {'vae': 1, 'avae': 0}) == (
      'from −R to R (R: eval.traversal_range, 1.5, 3)')


def test_study_file_keeps_every_command_and_the_report_one(tmp_path, monkeypatch):
  import study  # pylint: disable=g-import-not-at-top
  settings = study_config.get_config('test')
  for argv, report_only in ((['study.py', '--out=o', '--datasets=shapes'], False),
                            (['study.py', '--out=o', '--datasets=fashion_mnist'], False),
                            (['study.py', '--out=o', '--datasets=shapes'], False),
                            (['study.py', '--out=o', '--report_only'], True)):
    monkeypatch.setattr(sys, 'argv', argv)
    study.check_study_file(str(tmp_path), settings, report_only=report_only)
  record = json.loads((tmp_path / 'study.json').read_text())
  assert record['commands'] == ['python study.py --out=o --datasets=shapes',
                                'python study.py --out=o --datasets=fashion_mnist']
  assert record['report_command'] == 'python study.py --out=o --report_only'


def test_the_study_keeps_the_largest_seed_count_any_command_asked_for(tmp_path,
                                                                     monkeypatch):
  import study  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'argv', ['study.py', '--out=o'])
  settings = study_config.get_config('test')
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  counts = []
  # Without --seeds the budget's count stands in (test: 1, cpu: 3): it neither raises
  # nor lowers the study's.
  for seeds, given in ((2, True), (1, False), (3, True), (1, True), (5, False)):
    settings.seeds = seeds
    counts.append(study.check_study_file(str(tmp_path / 'a'), settings, seeds_given=given))
  assert counts == [2, 2, 3, 3, 3]
  # A study begun without --seeds has the budget's count; a later plain command keeps it.
  settings.seeds = 1
  assert study.check_study_file(str(tmp_path / 'b'), settings, seeds_given=False) == 1
  settings.seeds = 3
  assert study.check_study_file(str(tmp_path / 'b'), settings, seeds_given=False) == 1


def test_report_only_reports_every_seed_of_the_study(study_dir, tmp_path):
  out = tmp_path / 'study'
  shutil.copytree(study_dir[0], out)
  record = json.loads((out / 'study.json').read_text())
  record['seeds'] = 2  # as if a command had asked for --seeds=2 and not yet run seed 1
  (out / 'study.json').write_text(json.dumps(record))
  # Without --budget, the study's own (test; the flag's default, cpu, was refused).
  _study(f'--out={out}', '--report_only', '--publish=false')
  assert '8 of 16 runs finished (2 dataset(s) × 4 models × 2 seed(s))' in _read(
      out / 'results.md')


def test_a_rerun_removes_the_temporary_files_of_a_killed_write(study_dir, tmp_path):
  # study.py writes the records of finished runs, which train.py never opens again.
  out = tmp_path / 'study'
  shutil.copytree(study_dir[0], out)
  dead = processes.dead_pid()
  left = [processes.temporary_of(path, dead)
          for path in (out / 'study.json', out / 'shapes' / 'vae' / 'seed0' / 'study_run.json')]
  for path in left:
    with open(path, 'w') as f:
      f.write('')
  stdout = _study(f'--out={out}', '--report_only', '--publish=false').stdout
  assert f'[study] removed 2 temporary file(s) of a killed write in {out}\n' in stdout
  assert not any(os.path.exists(p) for p in left)


def test_a_smaller_seeds_flag_leaves_no_seed_of_the_study_out(tmp_path, monkeypatch):
  import study  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'argv', ['study.py', '--out=o', '--seeds=3'])
  settings = study_config.get_config('test')
  settings.seeds = 3
  study.check_study_file(str(tmp_path), settings)
  _study(f'--out={tmp_path}', '--budget=test', '--report_only', '--seeds=1',
         '--publish=false')
  assert '0 of 24 runs finished (2 dataset(s) × 4 models × 3 seed(s))' in _read(
      tmp_path / 'results.md')


def test_ground_truth_is_per_seed_where_the_eval_sets_differ(tmp_path):
  def run(dataset, seed, gt, rec):
    metrics = {'gt_sharpness_mean': gt, 'rec_sharpness_mean': rec}
    return study_report.Run(dataset, 'vae', seed, str(tmp_path), metrics, {}, [], {})
  # shapes: another eval set per seed; its reconstructions are sharper than seed 0's data
  # but not than their own seed's.
  shapes = [run('shapes', 0, 0.02, 0.025), run('shapes', 1, 0.03, 0.028)]
  assert study_report.ground_truth_by_seed(shapes, 'shapes', 'gt_sharpness_mean') == {
      0: 0.02, 1: 0.03}
  row = [l for l in study_report.table_iii(shapes, 'shapes', ['vae']).splitlines()
         if 'harpness' in l][0]
  sd = statistics.stdev([0.02, 0.03])
  assert f'| 0.025 ± {sd:.2g} |' in row
  fashion = [run('fashion_mnist', 0, 0.02, 0.01), run('fashion_mnist', 1, 0.02, 0.012)]
  row = [l for l in study_report.table_iii(fashion, 'fashion_mnist', ['vae']).splitlines()
         if 'harpness' in l][0]
  assert '| 0.02 |' in row


def test_reconstructions_as_sharp_as_the_data_are_not_called_sharper():
  """The sharpness check names a model only where its reconstructions are sharper than
  the data on average: equal sharpness (difference 0) is not sharper."""
  def run(seed, gt, rec):
    return _run('vae', seed, gt_sharpness_mean=gt, rec_sharpness_mean=rec)
  section = study_report._sharpness_section  # pylint: disable=protected-access
  lines, _, _ = section([run(0, 0.02, 0.02), run(1, 0.03, 0.03)], 'shapes', ['vae'])
  assert 'no model\'s reconstructions are sharper than the data' in lines[0], lines
  lines, _, _ = section([run(0, 0.02, 0.025), run(1, 0.03, 0.03)], 'shapes', ['vae'])
  assert 'reconstructions sharper than the data: VAE (' in lines[0], lines


def test_a_dataset_that_cannot_be_read_stops_the_study_before_any_run():
  import study  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  settings = study_config.get_config('test')
  settings.fashion_mnist.dataset = 'arrays:/nonexistent/fashion-mnist'
  with pytest.raises(app.UsageError, match=r"dataset fashion_mnist: arrays path "
                     r"'/nonexistent/fashion-mnist' does not exist.*apt-get install "
                     'dataset-fashion-mnist'):
    study.check_datasets(settings)


@contextlib.contextmanager
def _study_flags(monkeypatch, flag_args):
  """study.py's flags parsed from FLAG_ARGS in this process, its start-up (huge pages,
  output streams, XLA flags, log settings, the compilation cache) stubbed out."""
  import study  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from avae_jax import cli, hugepages, summary  # pylint: disable=g-import-not-at-top
  for module, name in ((hugepages, 'reexec'), (cli, 'survive_a_gone_reader'),
                       (xla_flags, 'apply'), (summary, 'quiet_library_logs'),
                       (study, '_enable_compilation_cache')):
    monkeypatch.setattr(module, name, lambda *args: None)
  monkeypatch.setattr(sys, 'argv', ['study.py'])
  flags.FLAGS(['study.py', *flag_args])
  try:
    yield
  finally:
    flags.FLAGS.unparse_flags()


def _study_main(monkeypatch, flag_args, raises):
  """study.main in this process (_study_flags); returns the ExceptionInfo of the `raises`
  it must raise."""
  import study  # pylint: disable=g-import-not-at-top
  with _study_flags(monkeypatch, flag_args), pytest.raises(raises) as info:
    study.main(['study.py'])
  return info


def test_the_settings_flags_are_checked_and_put_in_canonical_order(monkeypatch):
  import study  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top

  def settings(*flag_args):
    with _study_flags(monkeypatch, ['--out=o', *flag_args]):
      return study.settings_from_flags('test')
  s = settings('--datasets=fashion_mnist,shapes', '--variants=avae_s,vae', '--seeds=2')
  assert (s.datasets, s.variants, s.seeds) == ('shapes,fashion_mnist', 'vae,avae_s', 2)
  for flag_args, message in ((['--seeds=0'], '--seeds must be >= 1'),
                             (['--datasets='], '--datasets takes names from'),
                             (['--variants=vae,gan'], "--variants takes names from .*'gan'")):
    with pytest.raises(app.UsageError, match=message):
      settings(*flag_args)


def test_a_study_interrupted_in_a_run_exits_with_the_signals_status(tmp_path, monkeypatch,
                                                                    capsys):
  import study  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top

  def run_study(*args):
    raise trainer.TrainingInterrupted(signal.SIGTERM, 7)
  monkeypatch.setattr(study, 'run_study', run_study)
  monkeypatch.setattr(study, 'check_datasets', lambda settings: None)
  info = _study_main(monkeypatch, [f'--out={tmp_path}', '--budget=test', '--publish=false'],
                     SystemExit)
  assert info.value.code == 128 + signal.SIGTERM
  assert 'the same study.py command resumes the study' in capsys.readouterr().err


def test_a_test_budget_study_is_not_published_unless_asked(tmp_path, monkeypatch, capsys):
  # Its report would replace the checkout's docs/results.md.
  import study  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(study, 'run_study', lambda *args: [])
  monkeypatch.setattr(study, 'check_datasets', lambda settings: None)
  docs = tmp_path / 'docs'
  with _study_flags(monkeypatch, [f'--out={tmp_path / "out"}', '--budget=test',
                                  f'--publish_dir={docs}']):
    study.main(['study.py'])
  assert (tmp_path / 'out' / study_report.REPORT).exists() and not docs.exists()
  assert 'publish' not in capsys.readouterr().err


def test_a_study_is_partial_while_any_run_has_not_finished():
  import study  # pylint: disable=g-import-not-at-top
  whole = study_config.get_config('test')  # 2 datasets x 4 models x 1 seed
  assert study._partial(whole, 8, 8) == ''
  assert study._partial(whole, 7, 8) == '1 of its 8 runs have not finished'


def test_a_report_without_seeds_keeps_the_studys_fewer_seeds_than_its_budget(
    tmp_path, monkeypatch):
  # A cpu-budget study (3 seeds) begun with --seeds=1: a plain --report_only reports its
  # one seed (the budget's 3 would be refused as raising the count).
  import study  # pylint: disable=g-import-not-at-top
  settings = study_config.get_config('cpu')
  settings.seeds = 1
  monkeypatch.setattr(sys, 'argv', ['study.py', f'--out={tmp_path}', '--seeds=1'])
  study.check_study_file(str(tmp_path), settings)
  with _study_flags(monkeypatch, [f'--out={tmp_path}', '--report_only', '--publish=false']):
    study.main(['study.py'])
  assert '× 1 seed(s)' in _read(tmp_path / study_report.REPORT)


def test_a_study_stopped_by_its_datasets_records_nothing(tmp_path, monkeypatch):
  # A study.json written before the check held --out to the budget of a study in which
  # nothing ran: another --budget was then refused there.
  import study  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top

  def unreadable(settings):
    raise app.UsageError('dataset shapes: unreadable')
  monkeypatch.setattr(study, 'check_datasets', unreadable)
  info = _study_main(monkeypatch, [f'--out={tmp_path}', '--budget=test', '--datasets=shapes',
                                   '--variants=vae', '--publish=false'], app.UsageError)
  assert str(info.value) == 'dataset shapes: unreadable'
  assert not (tmp_path / study_report.STUDY_FILE).exists()


def test_report_only_cannot_raise_the_seed_count(tmp_path, monkeypatch):
  # A report-only command raised study.json's count, and the next rerun trained the extra
  # seeds; a smaller or equal --seeds with it is fine (it never lowers the count).
  import study  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'argv', ['study.py', '--out=o'])
  settings = study_config.get_config('test')
  settings.seeds = 2
  study.check_study_file(str(tmp_path), settings)
  settings.seeds = 5
  with pytest.raises(app.UsageError, match=r'--seeds=5 would raise the study\'s seed count '
                     r'\(2\).*--report_only'):
    study.check_study_file(str(tmp_path), settings, report_only=True)
  assert json.loads((tmp_path / study_report.STUDY_FILE).read_text())['seeds'] == 2
  settings.seeds = 1
  assert study.check_study_file(str(tmp_path), settings, report_only=True) == 2


def test_read_history_merges_resumed_and_drops_eval_rows(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': 0, 'eval/rec_mse': 0.2},  # an evaluation at a step no training row has
          {'step': 1, 'loss': 5.0}, {'step': 2, 'loss': 4.0},
          {'step': 2, 'loss': 3.5},  # re-logged after a resume: the later value wins
          {'step': 3, 'loss': 3.0, 'kl': 1.0},
          {'step': 3, 'eval/rec_mse': 0.1}, {'step': 3, 'eval/fid_pool': 9.0}]
  # Each was a traceback.
  damaged = ('\n\x9b\xff{"step": 3}\n[1]\n{"loss": 1.0}\n{"step": null}\n{"step": NaN}\n'
             '{"step": true, "loss": 9.0}\n')
  path.write_bytes(('\n'.join(json.dumps(r) for r in rows) + damaged).encode('latin-1')
                   + b'{"step": 4, "lo')
  h = study_report.read_history(str(path))
  assert [r['step'] for r in h] == [1, 2, 3]
  assert h[1]['loss'] == 3.5
  assert h[2] == {'step': 3, 'loss': 3.0, 'kl': 1.0}


def test_gating_rates_weight_windows_by_steps():
  # Pre-training 10 steps; windows of 5 and 15 adversarial steps with rates 1.0 and 0.2.
  history = [{'step': 10, 'loss': 1.0},
             {'step': 15, 'disc_updated': 1.0, 'vae_updated': 0.0, 'disc_accuracy': 0.6},
             {'step': 30, 'disc_updated': 0.2, 'vae_updated': 1.0, 'disc_accuracy': 0.8}]
  run = study_report.Run('shapes', 'avae', 0, '', None, {'pretrain_steps': 10}, history, {})
  g = study_report.gating_stats(run)
  assert g['steps'] == 20
  assert g['disc_updated'] == pytest.approx((5 * 1.0 + 15 * 0.2) / 20)
  assert g['vae_updated'] == pytest.approx(15 / 20)
  assert g['acc_first'] == 0.6 and g['acc_last'] == 0.8


def _vae_and_avae_runs(base: list[dict], adv: list[dict]) -> list[study_report.Run]:
  """Seed 0's VAE and AVAE runs on shapes with these histories, 10 pre-training steps."""
  cfg = {'pretrain_steps': 10}
  return [study_report.Run('shapes', 'vae', 0, '', None, cfg, base, {}),
          study_report.Run('shapes', 'avae', 0, '', None, cfg, adv, {})]


def test_pretraining_identity_finds_differences():
  base = [{'step': 5, 'loss': 2.0, 'kl': 1.0}, {'step': 10, 'loss': 1.0, 'kl': 0.5}]
  adv = [dict(r) for r in base] + [{'step': 15, 'loss': 0.1, 'disc_accuracy': 0.5}]
  runs = _vae_and_avae_runs(base, adv)
  assert study_report.pretraining_identity(runs, 'shapes', 'vae', 'avae') == [(0, 0.0)]
  adv[1]['kl'] = 0.75
  assert study_report.pretraining_identity(runs, 'shapes', 'vae', 'avae') == [(0, 0.25)]


def test_pretraining_identity_compares_the_same_windows_of_an_interrupted_run():
  # AVAE stopped by SIGTERM at step 7 logged steps 6-7 then; its row at 10 covers 8-10
  # alone, the VAE's 6-10: their means differ though every step was the same.
  base = [{'step': 5, 'loss': 2.0}, {'step': 10, 'loss': 1.0}]
  adv = [{'step': 5, 'loss': 2.0}, {'step': 7, 'loss': 1.3}, {'step': 10, 'loss': 0.8},
         {'step': 15, 'loss': 0.1, 'disc_accuracy': 0.5}]
  runs = _vae_and_avae_runs(base, adv)
  assert study_report.pretraining_identity(runs, 'shapes', 'vae', 'avae') == [(0, 0.0)]
  adv[0]['loss'] = 2.5
  assert study_report.pretraining_identity(runs, 'shapes', 'vae', 'avae') == [(0, 0.5)]
  # No window in common: the check cannot be made.
  del base[0]
  assert study_report.pretraining_identity(runs, 'shapes', 'vae', 'avae') == [(0, None)]


def test_checks_of_runs_not_finished_are_reported_as_not_made():
  # Neither run finished nor logged: the findings' all-clear would name checks that never
  # ran.
  runs = _vae_and_avae_runs([], [])
  assert study_report.pretraining_identity(runs, 'shapes', 'vae', 'avae') == [(0, None)]
  _, warnings, unchecked = study_report._diagnostics(  # pylint: disable=protected-access
      runs, 'shapes', ['vae', 'avae'])
  assert not warnings
  assert unchecked == [
      'shapes: gating and posterior collapse of the unfinished run(s) VAE seed 0, AVAE seed 0',
      'shapes: pre-training of AVAE seed 0 against VAE (no window of steps logged by both)']


def test_budgets_are_identical_across_models():
  # The budgets, datasets and models as written, not configs/study.py's own lists: a
  # budget dropped from BUDGETS would pass here (and study.py --budget=accelerator fail).
  for budget in ('cpu', 'accelerator', 'test'):
    s = study_config.get_config(budget)
    for ds in ('shapes', 'fashion_mnist'):
      cfgs = [study_config.run_config(s, ds, v, 1, {'mse': 1.0, 'mae': 2.0})
              for v in ('vae', 'avae', 'vae_s', 'avae_s')]
      flat = [c.to_dict() for c in cfgs]
      for f in flat:
        f.pop('variant')
      assert all(f == flat[0] for f in flat[1:])
      assert cfgs[0].seed == 1 and not cfgs[0].calibrate.enabled
      assert cfgs[0].loss.weights.mae == 2.0
  assert study_config.get_config('cpu').seeds >= 3


def test_the_fashion_mnist_size_is_the_debian_files():
  # The budgets' epochs and the report's settings table count the training images.
  path = os.path.join(study_config.FASHION_MNIST_ARRAYS.split(':', 1)[1],
                      'train-images-idx3-ubyte.gz')
  if not os.path.exists(path):
    pytest.skip('Debian dataset-fashion-mnist is not installed')
  with gzip.open(path) as f:
    magic, count = struct.unpack('>II', f.read(8))
  assert magic == 0x803 and count == study_config.FASHION_MNIST_TRAIN
  assert study_report.FASHION_MNIST_TRAIN == study_config.FASHION_MNIST_TRAIN


def test_a_run_whose_final_metrics_do_not_parse_is_not_finished(tmp_path):
  # The trainer evaluates such a run again; the study must not skip it as done.
  assert not study_report.is_finished(str(tmp_path))
  (tmp_path / 'final_metrics.json').write_text('{"step": 8, "rec_m')
  assert not study_report.is_finished(str(tmp_path))
  files.write_json(tmp_path / 'final_metrics.json', {'step': 8})
  assert study_report.is_finished(str(tmp_path))


def test_past_max_hours_nothing_is_calibrated_or_trained(tmp_path, monkeypatch):
  import study  # pylint: disable=g-import-not-at-top
  now = [0.0]
  calls = []

  def train_one(out, settings, dataset, variant, seed, weights):
    del out, settings, weights
    calls.append(('train', dataset, variant, seed))
    now[0] += 3600.0  # each run takes an hour
    return 'done'
  monkeypatch.setattr(study, 'calibrate', lambda out, s, d: calls.append(('calibrate', d)))
  monkeypatch.setattr(study, 'train_one', train_one)
  monkeypatch.setattr(study.time, 'monotonic', lambda: now[0])
  settings = study_config.get_config('test')
  settings.seeds = 2
  settings.variants = 'vae,vae_s'
  statuses = study.run_study(str(tmp_path), settings, max_hours=1.5)
  # Two runs of shapes in 2 h; Fashion-MNIST's calibration would start past the limit.
  assert calls == [('calibrate', 'shapes'), ('train', 'shapes', 'vae', 0),
                   ('train', 'shapes', 'vae_s', 0)]
  assert [s.status for s in statuses] == ['done'] * 2 + ['skipped: --max_hours reached'] * 6


def test_a_failed_calibration_fails_its_datasets_compound_loss_runs_only(tmp_path,
                                                                          monkeypatch):
  import study  # pylint: disable=g-import-not-at-top
  calls = []

  def calibrate(out, settings, dataset):
    del out, settings
    calls.append(('calibrate', dataset))
    if dataset == 'shapes':
      raise FloatingPointError('calibration: non-finite loss')
    return {'mse': 1.0}

  def train_one(out, settings, dataset, variant, seed, weights):
    del out, settings
    calls.append(('train', dataset, variant, seed, weights))
    return 'done'
  monkeypatch.setattr(study, 'calibrate', calibrate)
  monkeypatch.setattr(study, 'train_one', train_one)
  settings = study_config.get_config('test')
  settings.seeds = 2
  settings.variants = 'vae,vae_s'
  statuses = study.run_study(str(tmp_path), settings)
  failed = 'failed: calibration of shapes: FloatingPointError: calibration: non-finite loss'
  # shapes is calibrated once, not again for seed 1; its VAE-S is never trained without
  # its λ's; the VAE and Fashion-MNIST go on.
  assert calls == [('calibrate', 'shapes'), ('train', 'shapes', 'vae', 0, None),
                   ('calibrate', 'fashion_mnist'),
                   ('train', 'fashion_mnist', 'vae', 0, {'mse': 1.0}),
                   ('train', 'fashion_mnist', 'vae_s', 0, {'mse': 1.0}),
                   ('train', 'shapes', 'vae', 1, None),
                   ('calibrate', 'fashion_mnist'),
                   ('train', 'fashion_mnist', 'vae', 1, {'mse': 1.0}),
                   ('train', 'fashion_mnist', 'vae_s', 1, {'mse': 1.0})]
  assert [s for s in statuses if s.status != 'done'] == [('shapes', 'vae_s', 0, failed),
                                                       ('shapes', 'vae_s', 1, failed)]
  # The report's list of unfinished runs gives the reason.
  info = json.loads((tmp_path / 'shapes' / 'vae_s' / 'seed1' / 'study_run.json').read_text())
  assert info['status'] == failed


@pytest.mark.parametrize('refused', ['image', 'workdir file'])
def test_a_refused_file_in_a_calibration_stops_the_study_unless_an_image(tmp_path,
                                                                          monkeypatch,
                                                                          refused):
  # As in a run (train_one): an image the data cannot read fails what needed it, while a
  # workdir file refused (or a full disk) would fail every later run too.
  import study  # pylint: disable=g-import-not-at-top
  from avae_jax import data  # pylint: disable=g-import-not-at-top
  denied = PermissionError(errno.EACCES, 'Permission denied', '/somewhere/file')

  def calibrate(out, settings, dataset):
    del out, settings, dataset
    if refused == 'workdir file':
      raise denied
    raise data.DataError('cannot read /somewhere/file') from denied
  monkeypatch.setattr(study, 'calibrate', calibrate)
  monkeypatch.setattr(study, 'train_one', lambda *args: 'done')
  settings = study_config.get_config('test')
  settings.seeds = 1
  settings.datasets = 'shapes'
  settings.variants = 'vae,vae_s'
  if refused == 'workdir file':
    with pytest.raises(PermissionError):
      study.run_study(str(tmp_path), settings)
    assert not (tmp_path / 'shapes' / 'vae_s' / 'seed0' / 'study_run.json').exists()
  else:
    statuses = study.run_study(str(tmp_path), settings)
    assert [s.status for s in statuses] == [
        'done', 'failed: calibration of shapes: DataError: cannot read /somewhere/file']


@pytest.mark.parametrize('ending', ['done', 'interrupted'])
def test_a_run_record_that_cannot_be_written_is_the_error(tmp_path, monkeypatch, ending):
  # After a run that ended well (or was interrupted), the record's own write error is
  # what stops the study: the record still says 'running'.
  import study  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top

  def train(config, workdir):
    del config, workdir
    if ending == 'interrupted':
      raise trainer.TrainingInterrupted(signal.SIGTERM, 7)
  monkeypatch.setattr(trainer, 'train_and_evaluate', train)
  writes = []
  write_json = study._write_json  # pylint: disable=protected-access

  def write_once(path, value):
    writes.append(value['status'])
    if len(writes) > 1:
      raise PermissionError(errno.EACCES, 'Permission denied', path)
    write_json(path, value)
  monkeypatch.setattr(study, '_write_json', write_once)
  with pytest.raises(PermissionError):
    study.train_one(str(tmp_path), study_config.get_config('test'), 'shapes', 'vae', 0, None)
  assert writes[0] == study_report.RUNNING and writes[-1].startswith(ending), writes
  info = json.loads((tmp_path / 'shapes' / 'vae' / 'seed0' / 'study_run.json').read_text())
  assert info['status'] == study_report.RUNNING


def test_a_study_with_a_failed_run_exits_with_status_1(tmp_path, monkeypatch, capsys):
  import study  # pylint: disable=g-import-not-at-top
  for name in ('_enable_compilation_cache', 'check_datasets'):
    monkeypatch.setattr(study, name, lambda *args: None)
  failure = 'failed: FloatingPointError: non-finite loss at step 3'
  monkeypatch.setattr(study, 'run_study', lambda out, settings, max_hours: [
      study.RunStatus('shapes', 'vae', 0, 'done'),
      study.RunStatus('shapes', 'avae', 0, failure),
      study.RunStatus('shapes', 'vae_s', 0, 'skipped: --max_hours reached')])
  exit_info = _study_main(monkeypatch, [f'--out={tmp_path}', '--budget=test',
                                        '--datasets=shapes', '--variants=vae,avae,vae_s',
                                        '--publish=false'], SystemExit)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert '[study] 1 run(s) failed' in err and f'shapes avae seed 0: {failure}' in err
  assert (tmp_path / 'results.md').exists()  # the report was written first


def test_a_calibration_in_progress_elsewhere_is_waited_for_not_repeated(tmp_path,
                                                                          monkeypatch):
  import threading  # pylint: disable=g-import-not-at-top
  import study  # pylint: disable=g-import-not-at-top

  def run_config(*args, **kwargs):  # the first step of calibrating
    del args, kwargs
    raise AssertionError('calibrated a second time')
  monkeypatch.setattr(study_config, 'run_config', run_config)
  settings = study_config.get_config('test')
  (tmp_path / 'shapes').mkdir()
  got = []
  # What another study.py process calibrating shapes holds.
  with files.exclusive(str(tmp_path / 'shapes'), 'study.py', lock_file='calibration.lock'):
    thread = threading.Thread(target=lambda: got.append(
        _outcome(study.calibrate, str(tmp_path), settings, 'shapes')))
    thread.start()
    # It found no calibration.json.
    processes.wait_until_blocked_on_a_lock(os.getpid(), alive=thread.is_alive)
    files.write_text(str(tmp_path / 'shapes' / 'calibration.json'),
                     '{"weights": {"mse": 1.0, "mae": 2.5}}')
  thread.join(timeout=60)
  assert got == [{'mse': 1.0, 'mae': 2.5}]


def _outcome(fn, *args):
  """fn(*args), or the exception it raised."""
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return e


def test_an_interrupted_run_is_recorded_and_stops_the_study(tmp_path, monkeypatch, capsys):
  import study  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top

  def stopped(config, workdir):  # what train_and_evaluate raises after SIGTERM's checkpoint
    del config, workdir
    raise trainer.TrainingInterrupted(signal.SIGTERM, 7)
  monkeypatch.setattr(trainer, 'train_and_evaluate', stopped)
  settings = study_config.get_config('test')
  dataset, variant = study_config.DATASETS[0], study_config.VARIANTS[0]
  with pytest.raises(trainer.TrainingInterrupted):
    study.train_one(str(tmp_path), settings, dataset, variant, 0, None)
  with open(tmp_path / dataset / variant / 'seed0' / 'study_run.json') as f:
    info = json.load(f)
  status = 'interrupted: stopped by SIGTERM at step 7, whose checkpoint is saved'
  assert info['status'] == status
  assert info['sessions'] == 1 and 'error' not in info
  assert re.search(rf'^\[study\] {dataset} {variant} seed 0 \(\d+ s\): {re.escape(status)}$',
                   capsys.readouterr().out, re.M)


def test_ctrl_c_outside_the_training_loop_is_recorded_as_an_interruption(tmp_path):
  # Ctrl-C during a run's calibration, compilation or evaluation ends the study at once
  # (os._exit: no `finally`), and the run's record said 'running': the report called it
  # killed, and the rerun counted a killed session.
  script = textwrap.dedent(f"""
      import os, signal, time
      import study
      from avae_jax import distributed, trainer
      from configs import study as study_config

      def calibrating(config, workdir):
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        raise AssertionError('not interrupted')

      trainer.train_and_evaluate = calibrating
      with distributed.exit_on_interrupt('[study] interrupted by Ctrl-C'):
        study.train_one({str(tmp_path)!r}, study_config.get_config('test'), 'shapes', 'vae',
                        0, None)
      """)
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == '[study] interrupted by Ctrl-C'
  info = json.loads((tmp_path / 'shapes' / 'vae' / 'seed0' / 'study_run.json').read_text())
  assert info['status'] == 'interrupted: Ctrl-C outside the training loop', info
  assert 'alive' not in info and 0.5 <= info['wall_s'] < 60, info
  run = study_report.Run('shapes', 'vae', 0, '', None, {}, [], info)
  assert study_report.run_status(run).startswith(
      'interrupted: Ctrl-C outside the training loop')


def test_a_run_another_process_trains_is_skipped_not_failed(tmp_path, monkeypatch):
  import study  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top
  calls = []

  def train_and_evaluate(config, workdir):  # takes the workdir's lock, as the trainer does
    del config
    calls.append(workdir)
    with files.exclusive(workdir, 'train.py'):
      return {}
  monkeypatch.setattr(trainer, 'train_and_evaluate', train_and_evaluate)
  settings = study_config.get_config('test')
  workdir = tmp_path / 'shapes' / 'vae' / 'seed0'
  workdir.mkdir(parents=True)
  info = '{"sessions": 1, "status": "interrupted: by SIGTERM", "wall_s": 9.0}'
  (workdir / 'study_run.json').write_text(info)
  # What another study.py process training this run holds: its study lock, the trainer's.
  with files.exclusive(str(workdir), 'study.py', lock_file='study_run.lock'), \
      files.exclusive(str(workdir), 'train.py'):
    status = study.train_one(str(tmp_path), settings, 'shapes', 'vae', 0, None)
  assert status.startswith('skipped: being trained by another process (')
  assert calls == [] and (workdir / 'study_run.json').read_text() == info
  # Finished by the other process between the first check and the lock: not redone.
  checks, is_finished = iter([False, True]), study_report.is_finished
  monkeypatch.setattr(study_report, 'is_finished', lambda workdir: next(checks))
  assert study.train_one(str(tmp_path), settings, 'shapes', 'vae', 0, None) == 'done'
  assert calls == []
  # Finished, and its process still holds the lock to record the end: done, not skipped.
  monkeypatch.setattr(study_report, 'is_finished', is_finished)
  (workdir / 'final_metrics.json').write_text('{}')
  (workdir / 'study_run.json').write_text('{"sessions": 1, "status": "running"}')
  with files.exclusive(str(workdir), 'study.py', lock_file='study_run.lock'):
    assert study.train_one(str(tmp_path), settings, 'shapes', 'vae', 0, None) == 'done'
  assert calls == []


def test_captions_name_the_seeds_shown_when_seed_0_is_not_there(tmp_path, monkeypatch):
  # A study run with --seeds other than from 0, or whose seed 0 did not finish: the
  # captions said "seed 0" and the training curves had no thick line and no legend.
  def run(variant, seed, finished):
    workdir = tmp_path / f'{variant}{seed}'
    (workdir / 'eval').mkdir(parents=True)
    (workdir / 'eval' / 'samples.png').write_bytes(b'png of ' + workdir.name.encode())
    (workdir / study_report.POSTERIOR_FILE).write_text(json.dumps(
        {'active': 2, 'latent_dim': 4, 'kl_per_dim': [0.5, 2.0 + seed, 0.0, 1.0]}))
    return study_report.Run('shapes', variant, seed, str(workdir),
                            {'rec_mse': 0.1} if finished else None, {'pretrain_steps': 10},
                            [{'step': 10, 'loss': 1.0, 'rec': 0.1, 'mse': 0.1, 'kl': 2.0}], {})
  runs = [run('vae', 1, False), run('vae', 2, True), run('avae', 1, True)]
  out = tmp_path / 'out'
  figs, shown = study_report.copy_model_figures(runs, 'shapes', ['vae', 'avae'], str(out))
  assert shown == {'vae': 2, 'avae': 1}
  assert (out / figs[('vae', 'samples')]).read_bytes() == b'png of vae2'
  text, _, _ = study_report._diagnostics(runs, 'shapes', ['vae', 'avae'])
  assert 'last logged window of each phase, seed 1 of each model)' in text
  # The posterior's largest KLs come from each model's lowest finished seed.
  assert '| largest KL per dim (VAE seed 2, AVAE seed 1) |' in text
  assert '| VAE | 2/4 | 5.5 | 4.00, 1.00, 0.50, 0.00 |' in text
  # Seed 1 is drawn thick and labelled in the curves.
  labels = []
  plt = study_report._plt()
  real_plot = plt.Axes.plot
  def plot(self, *args, **kwargs):
    labels.append((kwargs.get('label'), kwargs.get('lw')))
    return real_plot(self, *args, **kwargs)
  monkeypatch.setattr(plt.Axes, 'plot', plot)
  assert study_report.plot_losses(runs, 'shapes', ['vae', 'avae'], str(tmp_path / 'l.png'))
  assert ('VAE', 1.4) in labels and ('AVAE', 1.4) in labels


_KILLED_CHILD = '''
import sys, time
sys.path.insert(0, {repo!r})
import study
from avae_jax import trainer
from configs import study as study_config
study.HEARTBEAT_S = 0.1

def train_and_evaluate(config, workdir):  # a session that is killed while it trains
  open({marker!r}, 'w').close()
  time.sleep(600)
trainer.train_and_evaluate = train_and_evaluate
study.train_one({out!r}, study_config.get_config('test'), 'shapes', 'vae', 0, None)
'''


def test_a_killed_session_is_reported_with_its_time_and_a_rerun_takes_over(tmp_path,
                                                                           monkeypatch):
  # SIGKILL (or the out-of-memory killer) left study_run.json as the previous session
  # wrote it: the report showed that session's status and lost this one's time.
  import study  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'out'
  workdir = out / 'shapes' / 'vae' / 'seed0'
  workdir.mkdir(parents=True)
  info_path = workdir / 'study_run.json'
  info_path.write_text('{"sessions": 1, "status": "interrupted: stopped by SIGTERM at step 7", '
                       '"wall_s": 9.0}')
  marker = tmp_path / 'training'
  child = subprocess.Popen([sys.executable, '-c', _KILLED_CHILD.format(
      repo=REPO, marker=str(marker), out=str(out))], cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not marker.exists():
      assert child.poll() is None, child.communicate()
      assert time.monotonic() < deadline
      time.sleep(0.1)
    # Recorded before the trainer started, and rewritten since (every HEARTBEAT_S).
    info = json.loads(info_path.read_text())
    assert info['status'] == 'running' and info['sessions'] == 2 and info['wall_s'] == 9.0
    while info['alive'] <= info['started']:
      assert time.monotonic() < deadline
      time.sleep(0.1)
      info = json.loads(info_path.read_text())
    run = study_report.load_runs(str(out), ['shapes'], ['vae'], 1)[0]
    assert study_report.run_status(run) == 'running: session 2 in progress'
    child.send_signal(signal.SIGKILL)
    child.communicate()
  finally:
    if child.poll() is None:
      child.kill()
      child.communicate()
  info = json.loads(info_path.read_text())
  assert info['status'] == 'running' and info['sessions'] == 2 and info['wall_s'] == 9.0
  ran = info['alive'] - info['started']
  assert 0 < ran < 120
  run = study_report.load_runs(str(out), ['shapes'], ['vae'], 1)[0]
  assert study_report.run_status(run) == (
      f'interrupted (process killed) after ≥ {round(ran)}s of session 2')
  assert study_report.wall_time(info) == (pytest.approx(9.0 + ran), True)
  row = study_report.per_seed_table([run], 'shapes', ['vae']).splitlines()[2]
  assert row.startswith('| VAE | 0 | interrupted (process killed) after ≥ ')
  assert row.endswith(f'| ≥ {round(9.0 + ran)}s |')
  # A rerun takes over: the killed session's time is kept and counted as such. (The
  # rerun's own session takes 2.5 s of a fake clock.)
  now = [100.0]

  def train_and_evaluate(config, workdir):
    del config, workdir
    now[0] += 2.5
    return {}
  monkeypatch.setattr(trainer, 'train_and_evaluate', train_and_evaluate)
  monkeypatch.setattr(study.time, 'monotonic', lambda: now[0])
  assert study.train_one(str(out), study_config.get_config('test'), 'shapes', 'vae', 0,
                         None) == 'done'
  info = json.loads(info_path.read_text())
  assert info['status'] == 'done' and info['sessions'] == 3
  assert info['killed_sessions'] == 1 and 'alive' not in info
  assert info['wall_s'] == pytest.approx(9.0 + ran + 2.5)
  assert study_report.wall_time(info) == (info['wall_s'], True)


def test_a_run_killed_after_its_final_metrics_is_recorded_as_done(tmp_path, monkeypatch):
  # Killed between the trainer's final_metrics.json and the study's record of the end: a
  # finished run is never trained again, so no later session counted the killed one.
  import study  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top

  def train_and_evaluate(config, workdir):
    raise AssertionError('a finished run was trained again')
  monkeypatch.setattr(trainer, 'train_and_evaluate', train_and_evaluate)
  settings = study_config.get_config('test')
  for seed, alive in ((0, 130.0), (1, 100.0)):  # seed 1: killed before a heartbeat
    workdir = tmp_path / 'shapes' / 'vae' / f'seed{seed}'
    workdir.mkdir(parents=True)
    (workdir / 'final_metrics.json').write_text('{"step": 10, "rec_mse": 0.1}')
    (workdir / 'study_run.json').write_text(json.dumps(
        {'sessions': 2, 'status': 'running', 'started': 100.0, 'alive': alive,
         'wall_s': 9.0 if seed == 0 else 0.0, 'error': 'session 1 failed'}))
    assert study.train_one(str(tmp_path), settings, 'shapes', 'vae', seed, None) == 'done'
    info = json.loads((workdir / 'study_run.json').read_text())
    assert info == {'sessions': 2, 'status': 'done', 'started': 100.0, 'killed_sessions': 1,
                    'wall_s': alive - 100.0 + (9.0 if seed == 0 else 0.0),
                    'finished': os.path.getmtime(workdir / 'final_metrics.json')}
  runs = study_report.load_runs(str(tmp_path), ['shapes'], ['vae'], 2)
  rows = study_report.per_seed_table(runs, 'shapes', ['vae']).splitlines()[2:]
  assert rows[0].startswith('| VAE | 0 | done |') and rows[0].endswith('| ≥ 39s |')
  assert rows[1].startswith('| VAE | 1 | done |') and rows[1].endswith('| ≥ 0s |')


def test_loss_scales_and_thick_curves_use_the_lowest_seed_that_logged(tmp_path, monkeypatch):
  # VAE seed 0 failed before its first log line and AVAE seed 0 before its adversarial
  # phase: the loss-scale table had no VAE rows, and neither model a thick curve.
  cfg = {'pretrain_steps': 10, 'image_size': 4, 'channels': 1}  # L_REC scale 4·4·1 = 16
  pre = {'step': 10, 'loss': 12.0, 'rec': 0.5, 'mse': 0.25, 'kl': 2.0}
  adv = {'step': 20, 'loss': 11.0, 'rec': 0.5, 'mse': 0.25, 'kl': 2.0, 'gen_loss': 0.7,
         'disc_loss': 1.3, 'disc_accuracy': 0.6, 'disc_updated': 1.0, 'vae_updated': 0.5}

  def run(variant, seed, history):
    return study_report.Run('shapes', variant, seed, str(tmp_path), None, cfg, history,
                            {'status': 'failed: FloatingPointError: non-finite loss'})
  runs = [run('vae', 0, []), run('vae', 1, [pre]), run('vae', 2, [dict(pre, step=5)]),
          run('avae', 0, [pre]), run('avae', 1, [pre, adv])]
  variants = ['vae', 'avae']
  text, _, _ = study_report._diagnostics(runs, 'shapes', variants)
  assert 'last logged window of each phase, VAE seed 1, AVAE seed 0)' in text
  # 16 · 0.5 = 8 and 16 · 0.25 = 4; AVAE seed 0 logged no adversarial window.
  assert '| VAE | pretrain | 8 | 4 | 2 | - | - | - |' in text
  assert '| AVAE | pretrain | 8 | 4 | 2 | - | - | - |' in text
  assert '| AVAE | adversarial |' not in text
  plt = study_report._plt()
  drawn, titles = [], []
  real_plot, real_suptitle = plt.Axes.plot, plt.Figure.suptitle

  def plot(self, x, y, **kwargs):
    drawn.append((kwargs.get('label'), kwargs.get('lw'), tuple(x)))
    return real_plot(self, x, y, **kwargs)

  def suptitle(self, text, **kwargs):
    titles.append(text)
    return real_suptitle(self, text, **kwargs)
  monkeypatch.setattr(plt.Axes, 'plot', plot)
  monkeypatch.setattr(plt.Figure, 'suptitle', suptitle)
  assert study_report.plot_losses(runs, 'shapes', variants, str(tmp_path / 'losses.png'))
  thick = {(label, steps) for label, lw, steps in drawn if lw == 1.4}
  assert thick == {('VAE', (10.0,)), ('AVAE', (10.0,))}
  assert 'thick: VAE seed 1, AVAE seed 0;' in titles[-1]
  drawn.clear()
  assert study_report.plot_adversarial(runs, 'shapes', variants, str(tmp_path / 'adv.png'))
  assert {(label, lw) for label, lw, _ in drawn} == {('AVAE', 1.4)}
  assert titles[-1].endswith('(per logged window; thick: seed 1 of each model)')


def _shapes_settings(adversarial_steps=10):
  """The study settings of shapes that _reasons reads: 10 pre-training steps of 64 of 640."""
  return {'shapes': ml_collections.ConfigDict(
      {'dataset': 'shapes', 'num_train': 640, 'pretrain_steps': 10,
       'adversarial_steps': adversarial_steps, 'batch_size': 64})}


def test_likely_reasons_name_the_seed_they_quote():
  # AVAE seed 0 logged an adversarial window but did not finish: the loss-scale table
  # quotes seed 0, the reasons seed 1, and each says which.
  cfg = {'pretrain_steps': 10, 'image_size': 4, 'channels': 1}
  pre = {'step': 10, 'loss': 12.0, 'rec': 0.5, 'mse': 0.25, 'kl': 2.0}

  def run(variant, seed, gen_loss, finished):
    adv = dict(pre, step=20, gen_loss=gen_loss, disc_accuracy=0.6, disc_updated=1.0,
               vae_updated=0.5)
    return study_report.Run('shapes', variant, seed, '', {'kl_mean': 2.0} if finished else None,
                            cfg, [pre, adv], {})
  runs = [run('avae', 0, 0.5, False), run('avae', 1, 0.7, True)]
  settings = _shapes_settings()
  text, _, _ = study_report._diagnostics(runs, 'shapes', ['avae'])
  assert '| AVAE | adversarial | 8 | 4 | 2 | - | 0.5 |' in text
  reasons = study_report._reasons(runs, 'shapes', settings)
  assert any(r.startswith('AVAE (seed 1): the adversarial term λ_adv·(−log D) = 0.7 ')
             for r in reasons), reasons
  # VAE-S's ratio is its lowest finished seed's (rec 0.5 / mse 0.25), the KLs are means.
  runs = [study_report.Run('shapes', 'vae_s', s, '', {'kl_mean': kl}, cfg, [pre], {})
          for s, kl in ((1, 6.0), (2, 8.0))] + [
              study_report.Run('shapes', 'vae', 0, '', {'kl_mean': 3.0}, cfg, [pre], {})]
  (line,) = [r for r in study_report._reasons(runs, 'shapes', settings)
             if r.startswith('VAE-S')]
  assert line.startswith('VAE-S (seed 1): its calibrated L_REC is 2.0× its own MSE term')
  assert 'KL 7 nats vs 3 for VAE (means over 2 and 1 finished seed(s))' in line, line
  weaker = 'Part of any VAE-S gain may come from this weaker KL'
  assert line.endswith(weaker + ' rather than from the structure-aware terms themselves.')
  # A VAE-S whose KL is below VAE's does not show the weaker KL: the sentence says so
  # (it blamed the weaker KL next to numbers that contradicted it); without VAE, neither.
  runs[-1] = study_report.Run('shapes', 'vae', 0, '', {'kl_mean': 9.0}, cfg, [pre], {})
  (line,) = [r for r in study_report._reasons(runs, 'shapes', settings)
             if r.startswith('VAE-S')]
  assert line.endswith("KL 7 nats vs 9 for VAE (means over 2 and 1 finished seed(s)). Its KL "
                       "is not above VAE's here, so the data do not show this weaker KL at "
                       'work.'), line
  (line,) = [r for r in study_report._reasons(runs[:-1], 'shapes', settings)
             if r.startswith('VAE-S')]
  assert line.endswith('finished seed(s)).') and 'weaker' not in line.split('β')[1], line
  # L_REC at 0.8x the MSE (a KL weighted more, not less) under a KL above VAE's: the
  # sentence said "Its KL is not above VAE's here".
  low = dict(pre, rec=0.2)
  runs = [study_report.Run('shapes', 'vae_s', 0, '', {'kl_mean': 6.0}, cfg, [low], {}),
          study_report.Run('shapes', 'vae', 0, '', {'kl_mean': 3.0}, cfg, [pre], {})]
  (line,) = [r for r in study_report._reasons(runs, 'shapes', settings)
             if r.startswith('VAE-S')]
  assert 'is 0.8× its own MSE' in line and line.endswith(
      'KL 6 nats vs 3 for VAE (means over 1 and 1 finished seed(s)).'), line


def test_a_vae_s_kl_equal_to_vaes_is_not_above_it():
  """VAE-S's KL equal to VAE's is not above it: the reasons do not blame a weaker KL."""
  cfg = {'pretrain_steps': 10, 'image_size': 4, 'channels': 1}
  pre = {'step': 10, 'loss': 12.0, 'rec': 0.5, 'mse': 0.25, 'kl': 2.0}
  runs = [study_report.Run('shapes', 'vae_s', 0, '', {'kl_mean': 3.0}, cfg, [pre], {}),
          study_report.Run('shapes', 'vae', 0, '', {'kl_mean': 3.0}, cfg, [pre], {})]
  (line,) = [r for r in study_report._reasons(runs, 'shapes', _shapes_settings())
             if r.startswith('VAE-S')]
  assert line.endswith("Its KL is not above VAE's here, so the data do not show this weaker "
                       'KL at work.'), line


def test_durations_are_rounded_to_the_second_shown():
  duration = study_report._duration  # pylint: disable=protected-access
  assert [duration(x) for x in (None, 45.2, 59.6, 125.0, 3599.6, 7261.0)] == [
      '-', '45s', '1m00s', '2m05s', '1h00m', '2h01m']


def test_a_gated_update_that_ran_in_under_5_percent_of_the_steps_warns():
  # A finished AVAE run: 10 pre-training steps, one adversarial window to step 30.
  window = {'step': 30, 'disc_updated': 0.06, 'vae_updated': 0.04, 'disc_accuracy': 0.6}
  run = study_report.Run('shapes', 'avae', 0, '', {'rec_mse': 0.1}, {'pretrain_steps': 10},
                         [{'step': 10, 'loss': 1.0}, window], {})
  gating = study_report._gating_section  # pylint: disable=protected-access
  _, warnings, _ = gating([run], 'shapes', ['avae'])
  assert warnings == ['shapes AVAE seed 0: vae_updated ran in only 4% of the adversarial steps '
                      '(gating stuck)']


def test_one_active_latent_dimension_or_none_warns_of_posterior_collapse(tmp_path):
  section = study_report._posterior_section  # pylint: disable=protected-access
  runs = []
  for seed, active in enumerate((0, 1, 2)):
    workdir = tmp_path / f'seed{seed}'
    workdir.mkdir()
    # The statistics as the report caches them: read, not computed again.
    (workdir / study_report.POSTERIOR_FILE).write_text(json.dumps(
        {'kl_per_dim': [1.0, 0.5], 'var_mu': [0.5, 0.001], 'active': active,
         'latent_dim': 2, 'num_images': 10}))
    runs.append(study_report.Run('shapes', 'vae', seed, str(workdir), {'rec_mse': 0.1}, {},
                                 [], {}))
  _, warnings, unchecked = section(runs, 'shapes', ['vae'])
  assert warnings == [f'shapes VAE seed {s}: {s} active latent dimension(s): posterior collapse'
                      for s in (0, 1)]
  assert unchecked == []


def test_posterior_statistics_cover_every_eval_image_past_one_batch(tmp_path, monkeypatch):
  # 200 evaluation images: a batch of 128 and a padded one of 72. A stand-in encoder
  # whose code dimensions have variances 0.5, 0.05 and 0.005 over the images: two are
  # active at Burda et al.'s 0.01.
  config = test_api.tiny_config(**{'shapes.num_eval': 200, 'eval.num_images': 0})
  images = data.load(config, 'eval').get(np.arange(200))
  brightness = np.asarray(images, np.float64).reshape(200, -1).mean(1)
  scales = np.sqrt(np.array([0.5, 0.05, 0.005]) / brightness.var())
  logvar = -1.0

  class Encoder:
    def __init__(self):
      self.config = config

    def encode(self, x):
      m = np.asarray(x, np.float64).reshape(len(x), -1).mean(1)
      return m[:, None] * scales, np.full((len(x), 3), logvar)

  monkeypatch.setattr(api.TrainedModel, 'load', lambda *args, **kwargs: Encoder())
  run = study_report.Run('shapes', 'vae', 0, str(tmp_path), {'rec_mse': 0.1}, {}, [], {})
  got = study_report.posterior_stats(run)
  mu = brightness[:, None] * scales
  assert (got['num_images'], got['latent_dim'], got['active']) == (200, 3, 2)
  np.testing.assert_allclose(got['var_mu'], [0.5, 0.05, 0.005], rtol=1e-9)
  kl = (0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar)).mean(0)
  np.testing.assert_allclose(got['kl_per_dim'], kl, rtol=1e-9)


def test_the_header_says_at_least_where_any_run_time_is_a_lower_bound():
  settings = study_config.get_config('test')
  header = study_report._header  # pylint: disable=protected-access
  runs = [study_report.Run('shapes', 'vae', 0, '', {}, {}, [], {'wall_s': 60.0}),
          study_report.Run('shapes', 'avae', 0, '', None, {}, [],
                           {'wall_s': 30.0, 'killed_sessions': 1})]
  command = 'python study.py --out=o'
  lines = header(runs, settings, {'commands': [command], 'report_command': command}, {}, None)
  assert 'training and evaluation took at least 1m30s in total' in lines[2]
  # The report made by one of the study's own commands: said once.
  assert lines[2].startswith(f'Generated by `{command}` (budget')
  lines = header(runs[:1], settings, {'commands': [command],
                                      'report_command': command + ' --report_only'}, {}, None)
  assert 'took 1m00s in total' in lines[2]
  assert lines[2].startswith(f'Runs by `{command}`; this report by `{command} --report_only`')


def test_the_settings_show_avae_s_config_where_it_has_one():
  settings = study_config.get_config('test')
  runs = [study_report.Run('shapes', v, 0, '', {}, {'variant': v}, [], {})
          for v in ('vae', 'avae_s', 'avae')]
  text = '\n'.join(study_report._settings_section(runs, settings, ['shapes']))
  assert 'Full trainer config of shapes / AVAE-S / seed 0' in text
  text = '\n'.join(study_report._settings_section(runs[:1], settings, ['shapes']))
  assert 'Full trainer config of shapes / VAE / seed 0' in text


def test_the_budget_counts_the_epochs_of_pre_training():
  settings = _shapes_settings(adversarial_steps=30)
  budget = study_report._reasons([], 'shapes', settings)[0]
  assert budget.startswith('Budget: 10 pre-training steps (1.00 epochs) and 30 adversarial '
                           'steps at batch 64'), budget


def test_the_figures_are_the_lowest_finished_seeds_and_a_report_drops_old_ones(tmp_path):
  runs = []
  for seed in (2, 1, 0):
    workdir = tmp_path / 'out' / f'seed{seed}'
    (workdir / 'eval').mkdir(parents=True)
    (workdir / 'eval' / 'samples.png').write_bytes(f'seed {seed}'.encode())
    runs.append(study_report.Run('shapes', 'vae', seed, str(workdir),
                                 None if seed == 0 else {'rec_mse': 0.1}, {}, [], {}))
  paths, seeds = study_report.copy_model_figures(runs, 'shapes', ['vae'], str(tmp_path / 'f'))
  assert seeds == {'vae': 1}
  assert (tmp_path / 'f' / paths[('vae', 'samples')]).read_bytes() == b'seed 1'
  # A report made again starts its figures folder afresh: a figure of a model no longer
  # in the study would stay published.
  out = tmp_path / 'study'
  stale = out / study_report.FIGURE_DIR / 'shapes' / 'old_samples.png'
  stale.parent.mkdir(parents=True)
  stale.write_bytes(b'old')
  study_report.write_report(str(out), study_config.get_config('test'))
  assert (out / study_report.REPORT).exists() and not stale.exists()


def test_a_publish_dir_beside_out_is_no_problem(tmp_path):
  docs = tmp_path / 'docs'
  inside = docs / study_report.FIGURE_DIR / 'study'
  assert study_report.publish_problem(str(inside), str(docs)) is not None
  beside = docs / (study_report.FIGURE_DIR + '_study')  # a name that only starts alike
  assert study_report.publish_problem(str(beside), str(docs)) is None


def test_loss_scales_and_their_words_follow_the_runs_weights():
  # The table left out loss.kl_weight, and the text said λ_adv = 1 and L_REC summed over
  # pixels whatever the config said.
  cfg = {'pretrain_steps': 10, 'image_size': 4, 'channels': 1,
         'loss': {'kl_weight': 0.5, 'adversarial_weight': 2.0, 'reconstruction_scale': 10.0}}
  pre = {'step': 10, 'loss': 12.0, 'rec': 0.5, 'mse': 0.25, 'kl': 2.0}
  adv = dict(pre, step=20, gen_loss=0.75, disc_accuracy=0.6, disc_updated=1.0,
             vae_updated=0.5)
  run = study_report.Run('shapes', 'avae', 0, '', {'kl_mean': 2.0}, cfg, [pre, adv], {})
  scales = study_report.loss_scales(run)['adversarial']
  # 10 · 0.5, 10 · 0.25, 0.5 · 2, 2 · 0.75; the share 1.5 / (5 + 1 + 1.5).
  assert (scales['scaled_rec'], scales['scaled_mse'], scales['kl'], scales['adv']) == (
      5.0, 2.5, 1.0, 1.5)
  assert scales['adv_share'] == pytest.approx(0.2)
  text, _, _ = study_report._diagnostics([run], 'shapes', ['avae'])
  assert 'L_REC is multiplied by 10; the adversarial term is λ_adv·(−log D(x̃)) with ' \
      'λ_adv = 2.' in text
  assert '| AVAE | adversarial | 5 | 2.5 | 1 | - | 1.5 | 20% |' in text
  settings = _shapes_settings()
  (line,) = [r for r in study_report._reasons([run], 'shapes', settings)
             if r.startswith('AVAE')]
  assert '= 6 (λ_adv = 2, L_REC times 10); ' in line, line
  # VAE-S's effective β is its KL weight over its L_REC's multiple of the MSE (0.5 / 2).
  vae_s = study_report.Run('shapes', 'vae_s', 0, '', {'kl_mean': 2.0}, cfg, [pre], {})
  (line,) = [r for r in study_report._reasons([vae_s], 'shapes', settings)
             if r.startswith('VAE-S')]
  assert 'acts like a VAE with β ≈ 0.5/2.0: ' in line, line
  # AVAE-S's TC (γ = 2 · 0.5) counts among the VAE's terms: the share 1.5 / (5 + 1 + 1 + 1.5).
  tc_cfg = dict(cfg, loss=dict(cfg['loss'], tc_weight=2.0))
  tc_run = study_report.Run('shapes', 'avae_s', 0, '', {'kl_mean': 2.0}, tc_cfg,
                            [dict(pre, tc=0.5), dict(adv, tc=0.5)], {})
  scales = study_report.loss_scales(tc_run)['adversarial']
  assert (scales['tc'], scales['vae_terms']) == (1.0, 7.0)
  assert scales['adv_share'] == pytest.approx(1.5 / 8.5)
  # A config without the image's size has no scale: not a KeyError.
  bare = study_report.Run('shapes', 'avae', 0, '', None, {'pretrain_steps': 10}, [pre, adv], {})
  assert np.isnan(study_report.loss_scales(bare)['adversarial']['scaled_rec'])


@pytest.mark.parametrize('variants,gating,pretraining', [
    (['vae', 'avae', 'vae_s', 'avae_s'], True, 'AVAE/AVAE-S identical to VAE/VAE-S'),
    (['vae', 'vae_s'], False, None), (['avae', 'avae_s'], True, None),
    (['vae_s', 'avae_s', 'avae'], True, 'AVAE-S identical to VAE-S')])
def test_the_defect_checks_sentence_names_only_the_checks_that_ran(variants, gating,
                                                                   pretraining):
  # A report of VAE and VAE-S said its gating and shared pre-training were checked.
  lines = study_report._findings({}, [], [], variants)
  (sentence,) = [x for x in lines if x.startswith('**Defect checks:**')]
  assert ('no gating stuck on one side' in sentence) == gating, sentence
  assert 'no posterior collapse (> 1 active latent dimension)' in sentence
  if pretraining is None:
    assert 'pre-training' not in sentence, sentence
  else:
    assert f'pre-training of {pretraining} (see the checks per dataset).' in sentence
