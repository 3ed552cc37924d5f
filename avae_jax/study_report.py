"""The reproduction study's report: Table III per dataset, orderings, diagnostics, figures.

`write_report(out, settings)` reads every run of a study directory (written by study.py:
OUT/<dataset>/<variant>/seed<k>/ with final_metrics.json, metrics.jsonl, config.json) and
writes OUT/results.md with its figures in OUT/results/:

  * per dataset, a table laid out like the paper's Table III (mean ± standard deviation
    over seeds), the same numbers per seed, and the paper's orderings checked on paired
    seeds (run k of AVAE is run k of VAE fine-tuned);
  * the checks one makes before believing a failed claim: how often each gated update
    ran, the size of each loss term, KL per latent dimension (posterior collapse), and
    whether the pre-training of the adversarial models equals that of their base model;
  * the figures of each model (its lowest finished seed) and training curves from
    metrics.jsonl;
  * the λ's and how they were calibrated, and every setting.

`publish(out, docs)` copies the report to docs/results.md and docs/results/.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from avae_jax import config_lib
from avae_jax import files

NAMES = config_lib.VARIANT_NAMES
DATASET_NAMES = {'shapes': 'shapes (procedural, {size})',
                 'fashion_mnist': 'Fashion-MNIST (Debian dataset-fashion-mnist, {size})'}
TAP_NAMES = config_lib.TAP_NAMES
TAPS = tuple(TAP_NAMES)
FIGURES = config_lib.FIGURES
REPORT = 'results.md'
FIGURE_DIR = 'results'
POSTERIOR_FILE = 'study_posterior.json'
RUN_LOCK = 'study_run.lock'  # held by the study.py process training a run
# The layout of OUT: study.py writes it, the report reads it.
STUDY_FILE = config_lib.STUDY_FILE  # OUT/: the budget, seeds and commands of the study
CALIBRATION_FILE = 'calibration.json'  # OUT/<dataset>/: the λ's its runs share
RUN_FILE = 'study_run.json'  # each run's workdir: its sessions and status
RECORDS_DIR = 'runs'  # OUT/results/runs/: the files the report is made of, in OUT's layout
# Each run's files that the report reads (POSTERIOR_FILE is the report's own, made once).
RUN_RECORDS = (config_lib.CONFIG_FILE, config_lib.FINAL_METRICS_FILE,
               config_lib.TRAIN_LOG_FILE, RUN_FILE, POSTERIOR_FILE)
RUNNING = 'running'  # study_run.json's status while a session trains the run
# Fashion-MNIST's training images, as configs/study.py counts them (configs import no
# library module, and this one no config).
FASHION_MNIST_TRAIN = 60000
# A latent dimension is "active" (Burda et al. 2016) when Var_x(E[z_j|x]) > 0.01.
ACTIVE_THRESHOLD = 0.01

# The paper's Table III (CelebA 96×96), the reference for the relative changes.
PAPER = {
    'rec_sharpness_mean': {'gt': 0.112015, 'vae': 0.026969, 'avae': 0.031597,
                           'vae_s': 0.038958, 'avae_s': 0.045204},
    'rec_cosine_similarity': {'vae': 0.978226, 'avae': 0.978675, 'vae_s': 0.979577,
                              'avae_s': 0.980018},
    'rec_mse': {'vae': 0.010207, 'avae': 0.009804, 'vae_s': 0.009412, 'avae_s': 0.009189},
    'fid_64': {'vae': 0.6911, 'avae': 0.6370, 'vae_s': 0.5650, 'avae_s': 0.5224},
    'fid_192': {'vae': 11.2447, 'avae': 10.1863, 'vae_s': 8.9121, 'avae_s': 8.2571},
    'fid_768': {'vae': 1.0433, 'avae': 1.0433, 'vae_s': 1.0367, 'avae_s': 1.0521},
    'fid_2048': {'vae': 45.4467, 'avae': 44.3741, 'vae_s': 40.3900, 'avae_s': 38.4775},
}


# ---------------------------------------------------------------------------------------
# Reading runs.


@dataclasses.dataclass
class Run:
  """One (dataset, variant, seed) workdir and what it holds."""
  dataset: str
  variant: str
  seed: int
  workdir: str
  metrics: dict[str, Any] | None
  config: dict[str, Any] | None
  history: list[dict[str, float]]
  info: dict[str, Any]

  @property
  def finished(self) -> bool:
    """The trainer wrote config_lib.FINAL_METRICS_FILE."""
    return self.metrics is not None


def setting_list(settings: Any, field: str) -> list[str]:
  """The names in a comma-separated study setting ('datasets' or 'variants')."""
  return [name for name in str(settings[field]).split(',') if name]


def run_dir(out: str, dataset: str, variant: str, seed: int) -> str:
  """The workdir of one run."""
  return os.path.join(out, dataset, variant, f'seed{seed}')


def is_finished(workdir: str) -> bool:
  """A run is finished when the trainer wrote its final metrics (Run.finished, read)."""
  # Read, not only found: the trainer evaluates a run again whose file does not parse.
  return _read_json(os.path.join(workdir, config_lib.FINAL_METRICS_FILE)) is not None


def _read_json(path: str) -> Any:
  """The parsed JSON file, or None where it is missing or unreadable."""
  try:
    return files.read_json(path)
  except (OSError, ValueError):
    return None


def read_history(path: str) -> list[dict[str, float]]:
  """metrics.jsonl training rows, one per step (later values win: a resumed run re-logs some)."""
  rows: dict[int, dict[str, float]] = {}
  if not os.path.exists(path):
    return []
  # Bytes: a damaged line that is not UTF-8 is skipped, not a failure to read.
  with open(path, 'rb') as f:
    for line in f:
      row = files.jsonl_record(line)
      if row is None:
        continue  # an empty line, a line cut by a crash, a damaged one
      step = row['step']
      # The evaluation's scalars (eval/...) share step numbers with training rows.
      row = {k: v for k, v in row.items() if not k.startswith('eval/')}
      if len(row) > 1:
        rows.setdefault(step, {}).update(row)
  return [rows[s] for s in sorted(rows)]


def load_runs(out: str, datasets: Sequence[str], variants: Sequence[str],
              seeds: int) -> list[Run]:
  """Every run the study asks for, finished or not."""
  runs = []
  for dataset in datasets:
    for variant in variants:
      for seed in range(seeds):
        wd = run_dir(out, dataset, variant, seed)
        runs.append(Run(dataset, variant, seed, wd,
                        _read_json(os.path.join(wd, config_lib.FINAL_METRICS_FILE)),
                        _read_json(os.path.join(wd, config_lib.CONFIG_FILE)),
                        read_history(os.path.join(wd, config_lib.TRAIN_LOG_FILE)),
                        _read_json(os.path.join(wd, RUN_FILE)) or {}))
  return runs


def is_being_trained(workdir: str) -> bool:
  """Whether a process holds the run's RUN_LOCK, i.e. a study.py process is training it."""
  return files.is_held(workdir, RUN_LOCK)


def session_s(info: Mapping[str, Any]) -> float:
  """Seconds a session recorded as running had run by its last record (0 if none is)."""
  if info.get('status') != RUNNING:
    return 0.0
  try:
    return max(0.0, float(info.get('alive', info['started'])) - float(info['started']))
  except (KeyError, TypeError, ValueError):
    return 0.0


def wall_time(info: Mapping[str, Any]) -> tuple[float, bool]:
  """A run's recorded wall time and whether it is a lower bound.

  A session in progress, or one whose process was killed, counts up to its last record
  (study.py rewrites it every HEARTBEAT_S seconds), not to its end.
  """
  wall = float(info.get('wall_s') or 0.0) + session_s(info)
  return wall, info.get('status') == RUNNING or bool(info.get('killed_sessions'))


def run_status(run: Run) -> str:
  """The run's status for the report: 'done', its recorded status, or 'not run'.

  A session recorded as running is either still training (a process holds the run's
  lock) or was killed outright (SIGKILL, out of memory) before it could record its end.
  """
  if run.finished:
    return 'done'
  status = run.info.get('status') or 'not run'
  if status != RUNNING:
    return status
  session = run.info.get('sessions', '?')
  if is_being_trained(run.workdir):
    return f'running: session {session} in progress'
  return (f'interrupted (process killed) after ≥ {_duration(session_s(run.info))} of '
          f'session {session}')


# ---------------------------------------------------------------------------------------
# Statistics.


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
  """Mean, sample standard deviation (ddof=1; 0 for one value) and count of finite values."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return float('nan'), float('nan'), 0
  sd = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
  return float(np.mean(v)), sd, int(v.size)


def fmt(x: float | None, digits: int = 4) -> str:
  """A number with `digits` significant digits, '-' for missing."""
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return '-'
  if x == 0:
    return '0'
  return f'{x:.{digits}g}'


def fmt_ms(values: Iterable[float], digits: int = 4) -> str:
  """'mean ± sd' over seeds (just the value for one seed), '-' when nothing finished."""
  m, s, n = mean_sd(values)
  if n == 0:
    return '-'
  return fmt(m, digits) if n == 1 else f'{fmt(m, digits)} ± {fmt(s, 2)}'


def _metric(run: Run, key: str) -> float | None:
  if run.metrics is None or key not in run.metrics:
    return None
  v = run.metrics[key]
  return float(v) if isinstance(v, (int, float)) else None


def ground_truth_by_seed(runs: Sequence[Run], dataset: str, key: str) -> dict[int, float]:
  """A ground-truth metric per seed, from any finished run of that seed.

  Every model of a seed sees that seed's eval images (one set for Fashion-MNIST; shapes
  draws its eval set from the seed).
  """
  out = {}
  for r in runs:
    if r.dataset == dataset and r.finished and _finite(_metric(r, key)):
      out.setdefault(r.seed, _metric(r, key))
  return dict(sorted(out.items()))


def _fmt_ground_truth(per_seed: Mapping[int, float], spread: str = '') -> str:
  """One value where every seed saw the same images, else mean ± sd over the seeds
  followed by `spread`; '-' for none."""
  vals = list(per_seed.values())
  return fmt(vals[0]) if len(set(vals)) == 1 else (fmt_ms(vals) + spread if vals else '-')


def _by(runs: Sequence[Run], dataset: str, variant: str,
        finished: bool = False) -> list[Run]:
  """The runs of one model, by seed; only the finished ones with `finished`."""
  return sorted((r for r in runs if r.dataset == dataset and r.variant == variant
                 and (r.finished or not finished)), key=lambda r: r.seed)


def lowest_logged(runs: Sequence[Run], dataset: str, variants: Sequence[str],
                  key: str | None = None) -> dict[str, Run]:
  """Each model's lowest-seed run with a logged window (one with `key`, if given).

  A run that failed before its first log line has no history: shown for its model, it
  would leave the model out of the loss-scale table and without a thick line in the curves.
  """
  out = {}
  for v in variants:
    logged = [r for r in _by(runs, dataset, v)
              if any(key is None or key in h for h in r.history)]
    if logged:
      out[v] = logged[0]
  return out


def _seed_words(seeds: Mapping[str, int]) -> str:
  """'seed 0 of each model' when every shown run has that seed, else 'VAE seed 0, AVAE seed 1'."""
  if len(set(seeds.values())) == 1:
    return f'seed {next(iter(seeds.values()))} of each model'
  return ', '.join(f'{NAMES[v]} seed {k}' for v, k in seeds.items())


# ---------------------------------------------------------------------------------------
# Table III.


def _table_rows(has_fid: bool, has_mig: bool) -> list[tuple[str, str | None, str | None]]:
  """(row label, metric key, ground-truth key or literal) in Table III's order."""
  rows = [('Sharpness (Laplace) of reconstructions', 'rec_sharpness_mean', 'gt_sharpness_mean'),
          ('  its spread over images (std, as Table II\'s ±)', 'rec_sharpness_std',
           'gt_sharpness_std'),
          ('Cosine similarity', 'rec_cosine_similarity', '=1'),
          ('Mean Squared Error', 'rec_mse', '=0')]
  for d in TAPS:
    rows.append((f'FID - {TAP_NAMES[d]} (d={d}), reconstructions',
                 f'fid_rec_{d}' if has_fid else None, '=-'))
  rows.append(('Sharpness (Laplace) of random samples', 'sample_sharpness_mean',
               'gt_sharpness_mean'))
  rows.append(('  its spread over images (std)', 'sample_sharpness_std', 'gt_sharpness_std'))
  for d in TAPS:
    rows.append((f'FID - {TAP_NAMES[d]} (d={d}), random samples',
                 f'fid_sample_{d}' if has_fid else None, '=-'))
  if has_mig:
    rows.append(('MIG (posterior means vs the 6 ground-truth factors)', 'mig', '=-'))
    rows.append(('  the same codes shuffled across images (the estimator\'s floor)',
                 'mig_shuffled', '=-'))
  rows.append(('KL to the prior (nats, summed over latent dims)', 'kl_mean', '=-'))
  return rows


def table_iii(runs: Sequence[Run], dataset: str, variants: Sequence[str]) -> str:
  """Markdown table like Table III: one column per model, mean ± sd over seeds."""
  done = [r for r in runs if r.dataset == dataset and r.finished]
  has_fid = any('fid_rec_2048' in r.metrics for r in done)
  has_mig = any('mig' in r.metrics for r in done)
  head = ['Metric', 'Ground Truth'] + [NAMES[v] for v in variants]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for label, key, gt in _table_rows(has_fid, has_mig):
    if gt and gt.startswith('='):
      gt_cell = gt[1:]
    elif gt:  # shapes draws its eval set from the seed
      gt_cell = _fmt_ground_truth(ground_truth_by_seed(done, dataset, gt))
    else:
      gt_cell = '-'
    cells = []
    for v in variants:
      rs = _by(runs, dataset, v, finished=True)
      if key is None:
        cells.append('skipped' if rs else '-')
      else:
        values = [_metric(r, key) for r in rs]
        n = mean_sd(values)[2]
        # The caption gives each model's count of finished seeds; a cell over fewer (a
        # NaN or missing value) says so.
        cells.append(fmt_ms(values) + (f' (n={n})' if 0 < n < len(rs) else ''))
    lines.append(f'| {label} | {gt_cell} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def per_seed_table(runs: Sequence[Run], dataset: str, variants: Sequence[str]) -> str:
  """Every finished run's main numbers, one row per run."""
  cols = [('rec. sharpness', 'rec_sharpness_mean'), ('sample sharpness', 'sample_sharpness_mean'),
          ('MSE', 'rec_mse'), ('cosine', 'rec_cosine_similarity'),
          ('FID rec. 2048', 'fid_rec_2048'), ('FID samples 2048', 'fid_sample_2048'),
          ('MIG', 'mig'), ('KL', 'kl_mean')]
  head = ['model', 'seed', 'status'] + [c for c, _ in cols] + ['wall time']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for v in variants:
    for r in _by(runs, dataset, v):
      status = run_status(r)
      wall, at_least = wall_time(r.info)
      cells = [fmt(_metric(r, k)) for _, k in cols]
      # A session killed before its first heartbeat counts 0 s: '≥ 0s', not unknown.
      wall_cell = (('≥ ' if at_least else '') + _duration(wall)) if wall or at_least else '-'
      lines.append(f'| {NAMES[v]} | {r.seed} | {status.splitlines()[0][:60]} | '
                   + ' | '.join(cells) + f' | {wall_cell} |')
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------
# The paper's orderings, on paired seeds.


@dataclasses.dataclass
class Claim:
  """'a is better than b in metric key' (higher or lower is better)."""
  text: str
  key: str
  better: str  # 'higher' or 'lower'
  a: str
  b: str
  paper_key: str | None = None
  or_equal: bool = False
  datasets: tuple[str, ...] | None = None  # None: every dataset


def claims() -> list[Claim]:
  """The orderings the paper states (Tables II-III, Figure 2), as checkable claims."""
  out = []
  pairs = (('vae_s', 'vae', 'the compound loss sharpens'),
           ('avae', 'vae', 'adversarial fine-tuning sharpens'),
           ('avae_s', 'vae_s', 'adversarial fine-tuning sharpens'))
  for a, b, why in pairs:
    out.append(Claim(f'{NAMES[a]} reconstructions sharper than {NAMES[b]} ({why})',
                     'rec_sharpness_mean', 'higher', a, b, 'rec_sharpness_mean'))
  # Table II's sharpness of samples holds Table III's reconstruction values, truncated.
  for a, b, why in pairs:
    out.append(Claim(f'{NAMES[a]} samples sharper than {NAMES[b]} ({why})',
                     'sample_sharpness_mean', 'higher', a, b, 'rec_sharpness_mean'))
  for a, b, _ in pairs:
    out.append(Claim(f'{NAMES[a]} MSE equal or lower than {NAMES[b]}', 'rec_mse', 'lower',
                     a, b, 'rec_mse', or_equal=True))
  for a, b, _ in pairs:
    out.append(Claim(f'{NAMES[a]} cosine similarity equal or higher than {NAMES[b]}',
                     'rec_cosine_similarity', 'higher', a, b, 'rec_cosine_similarity',
                     or_equal=True))
  for a, b, _ in pairs:
    out.append(Claim(f'{NAMES[a]} FID (d=2048) of samples lower than {NAMES[b]}',
                     'fid_sample_2048', 'lower', a, b, 'fid_2048'))
  for a, b, _ in pairs:
    out.append(Claim(f'{NAMES[a]} FID (d=2048) of reconstructions lower than {NAMES[b]}',
                     'fid_rec_2048', 'lower', a, b, 'fid_2048'))
  # The paper's text: AVAE-S "improved the VAE's FID scores significantly in all cases";
  # its own Table III has AVAE-S above VAE at d = 768.
  for d in (64, 192, 768):
    note = ' (the paper\'s text; its Table III has the opposite)' if d == 768 else ''
    out.append(Claim(f'AVAE-S FID (d={d}) of reconstructions lower than VAE{note}',
                     f'fid_rec_{d}', 'lower', 'avae_s', 'vae', f'fid_{d}'))
  out.append(Claim('VAE-S MIG higher than VAE (the TC term disentangles)', 'mig', 'higher',
                   'vae_s', 'vae', None, datasets=('shapes',)))
  out.append(Claim('AVAE-S MIG higher than AVAE (the TC term disentangles)', 'mig', 'higher',
                   'avae_s', 'avae', None, datasets=('shapes',)))
  return out


# Below this relative difference an "equal or better" claim counts as equal. For a metric
# with a perfect value (cosine similarity: 1) it applies to the distance from that value:
# cosines of 0.92 and 0.925 differ by 0.5% but their gaps to 1 by 7%.
EQUAL_TOLERANCE = 0.01
PERFECT_VALUES = {'rec_cosine_similarity': 1.0}


def _finite(x: Any) -> bool:
  """A number that is neither None nor NaN nor infinite."""
  return x is not None and bool(np.isfinite(x))


def check_claim(runs: Sequence[Run], dataset: str, claim: Claim) -> dict[str, Any]:
  """Paired per-seed differences a - b, signed so that > 0 means the claim's direction."""
  a = {r.seed: _metric(r, claim.key) for r in _by(runs, dataset, claim.a, finished=True)}
  b = {r.seed: _metric(r, claim.key) for r in _by(runs, dataset, claim.b, finished=True)}
  seeds = sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s]))
  sign = 1.0 if claim.better == 'higher' else -1.0
  res: dict[str, Any] = {'n': len(seeds)}
  if claim.paper_key and claim.paper_key in PAPER:
    p = PAPER[claim.paper_key]
    if claim.a in p and claim.b in p:
      res['paper_rel'] = p[claim.a] / p[claim.b] - 1.0
  if not seeds:
    res['verdict'] = 'not measured'
    return res
  va = np.array([a[s] for s in seeds])
  vb = np.array([b[s] for s in seeds])
  d = sign * (va - vb)
  res.update(a_mean=float(va.mean()), b_mean=float(vb.mean()),
             diff_mean=float((va - vb).mean()),
             # One seed has no spread to measure (not a spread of 0).
             diff_sd=float(np.std(va - vb, ddof=1)) if len(seeds) > 1 else float('nan'),
             wins=int(np.sum(d > 0)))
  rel = float(va.mean() / vb.mean() - 1.0) if vb.mean() != 0 else float('nan')
  res['rel'] = rel
  perfect = PERFECT_VALUES.get(claim.key)
  if perfect is None:
    equal_rel = rel
  else:
    gap_b = perfect - vb.mean()
    equal_rel = float((perfect - va.mean()) / gap_b - 1.0) if gap_b != 0 else float('nan')
  n, wins = len(seeds), res['wins']
  if wins == n:
    verdict = 'holds (every seed)' if n > 1 else 'holds (1 seed)'
  elif claim.or_equal and np.isfinite(equal_rel) and abs(equal_rel) < EQUAL_TOLERANCE:
    verdict = f'holds: equal within {EQUAL_TOLERANCE:.0%}' + (
        '' if perfect is None else f' of the distance to {perfect:g}')
  elif wins == 0:
    verdict = 'does not hold (every seed)' if n > 1 else 'does not hold (1 seed)'
  else:  # the seeds disagree: the mean's sign alone would overstate the evidence
    verdict = (f'mixed: {wins}/{n} seeds hold, the mean '
               + ('holds' if np.mean(d) > 0 else 'does not'))
  res['verdict'] = verdict
  return res


def claims_table(runs: Sequence[Run], dataset: str) -> tuple[str, list[tuple[Claim, dict]]]:
  """Markdown table of the orderings on `dataset`, and the raw results."""
  lines = ['| claim (paper) | paper, CelebA | here: mean a vs b | paired Δ (a − b) ± sd | '
           'relative | verdict |', '|---|---|---|---|---|---|']
  results = []
  for c in claims():
    if c.datasets is not None and dataset not in c.datasets:
      continue
    r = check_claim(runs, dataset, c)
    results.append((c, r))
    if r['n'] == 0:
      lines.append(f'| {c.text} | {_paper_cell(r)} | - | - | - | {r["verdict"]} |')
      continue
    lines.append(
        f'| {c.text} | {_paper_cell(r)} | {fmt(r["a_mean"])} vs {fmt(r["b_mean"])} | '
        f'{fmt(r["diff_mean"], 3)}{_pm(r["diff_sd"])} (n={r["n"]}) | '
        f'{_signed_pct(r["rel"])} | {r["verdict"]} |')
  return '\n'.join(lines) + '\n', results


def _pm(sd: float) -> str:
  """' ± sd', or nothing where there is no spread (a single seed)."""
  return f' ± {fmt(sd, 2)}' if np.isfinite(sd) else ''


def _signed_pct(x: float | None) -> str:
  """A relative change as a signed percentage, '-' where there is none."""
  if x is None or not np.isfinite(x):
    return '-'
  p = 100 * x
  # The paper's cosine similarities differ by 0.05%: "+0.0%" would hide the ordering.
  return f'{p:+.1f}%' if abs(p) >= 0.1 or p == 0 else f'{p:+.2g}%'


def _paper_cell(r: dict[str, Any]) -> str:
  return _signed_pct(r['paper_rel']) if 'paper_rel' in r else 'qualitative (Fig. 2)'


# ---------------------------------------------------------------------------------------
# Diagnostics: the defects to rule out before believing a failed claim.


def _pretrain_steps(run: Run) -> int:
  """The run's pre-training steps (0 where its config.json is missing)."""
  return int((run.config or {}).get('pretrain_steps', 0))


def _phase_rows(run: Run) -> tuple[list[dict], list[dict]]:
  """metrics.jsonl rows of the pre-training and of the adversarial phase."""
  pre = _pretrain_steps(run)
  return ([h for h in run.history if h['step'] <= pre],
          [h for h in run.history if h['step'] > pre])


def _weighted(rows: list[dict], key: str, start: int) -> float | None:
  """Step-weighted mean of a windowed metric (each row averages the steps since the last)."""
  total, weight, prev = 0.0, 0, start
  for h in rows:
    n = int(h['step']) - prev
    prev = int(h['step'])
    if key in h and n > 0:
      total += h[key] * n
      weight += n
  return total / weight if weight else None


def gating_stats(run: Run) -> dict[str, Any]:
  """How often each gated update ran, and the discriminator's accuracy, in the adversarial phase."""
  pre = _pretrain_steps(run)
  _, adv = _phase_rows(run)
  if not adv:
    return {}
  return {
      'steps': int(adv[-1]['step']) - pre,
      'disc_updated': _weighted(adv, 'disc_updated', pre),
      'vae_updated': _weighted(adv, 'vae_updated', pre),
      'acc_first': adv[0].get('disc_accuracy'),
      'acc_last': adv[-1].get('disc_accuracy'),
      'acc_mean': _weighted(adv, 'disc_accuracy', pre),
      'gen_loss_last': adv[-1].get('gen_loss'),
      'disc_loss_last': adv[-1].get('disc_loss'),
  }


def _loss_weight(cfg: Mapping[str, Any], name: str) -> float:
  """A run config's loss.<name> weight (kl_weight, tc_weight, ...; 1.0 where absent)."""
  return float(cfg.get('loss', {}).get(name, 1.0))


def loss_scales(run: Run) -> dict[str, Any]:
  """Each term of the objective as it enters the loss, in the last logged window of each phase."""
  cfg = run.config or {}
  try:
    scale = config_lib.reconstruction_scale(cfg)
  except KeyError:  # a config without the image's size: no scale to give
    scale = math.nan
  kl_weight = _loss_weight(cfg, 'kl_weight')
  out = {}
  for phase, rows in zip(('pretrain', 'adversarial'), _phase_rows(run)):
    if not rows:
      continue
    h = rows[-1]
    row = {'scaled_rec': scale * h.get('rec', float('nan')),
           'scaled_mse': scale * h.get('mse', float('nan')),
           'kl': None if h.get('kl') is None else kl_weight * h['kl'], 'loss': h.get('loss')}
    if 'tc' in h:
      row['tc'] = _loss_weight(cfg, 'tc_weight') * h['tc']
    if 'gen_loss' in h:
      row['adv'] = _loss_weight(cfg, 'adversarial_weight') * h['gen_loss']
      # The VAE's own terms beside it, and the adversarial term's share of the sum.
      row['vae_terms'] = abs(row['scaled_rec']) + abs(row['kl'] or 0) + abs(row.get('tc') or 0)
      row['adv_share'] = row['adv'] / (row['vae_terms'] + row['adv'])
    out[phase] = row
  return out


def posterior_stats(run: Run) -> dict[str, Any] | None:
  """KL per latent dimension and active dimensions on the evaluation images (cached)."""
  if not run.finished:
    return None
  path = os.path.join(run.workdir, POSTERIOR_FILE)
  cached = _read_json(path)
  if cached is not None:
    return cached
  try:
    # Imported here: reading a finished study's numbers needs no jax.
    from avae_jax import api  # pylint: disable=g-import-not-at-top
    from avae_jax import data  # pylint: disable=g-import-not-at-top
    from avae_jax import evaluation  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    model = api.TrainedModel.load(run.workdir, devices=jax.local_devices()[:1])
    config = model.config
    source = data.load(config, 'eval')
    # The images the run's evaluation used (eval.num_images 0: all of them).
    n = data.image_count(int(config.eval.num_images), source.num_examples)
    if n < 1:
      return {'error': f'the eval split of {source.name!r} has no images'}
    mus, logvars = [], []
    for x, mask in data.eval_batches(source, min(128, n), n):
      mu, logvar = model.encode(x)
      k = int(mask.sum())
      mus.append(np.asarray(mu, np.float64)[:k])
      logvars.append(np.asarray(logvar, np.float64)[:k])
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {e}'}
  mu, logvar = np.concatenate(mus), np.concatenate(logvars)
  kl = evaluation.kl_per_dim(mu, logvar)
  var_mu = np.var(mu, axis=0)
  stats = {'kl_per_dim': [float(v) for v in kl], 'var_mu': [float(v) for v in var_mu],
           'active': int(np.sum(var_mu > ACTIVE_THRESHOLD)), 'latent_dim': int(mu.shape[1]),
           'num_images': int(mu.shape[0])}
  files.write_json(path, stats)
  return stats


def pretraining_identity(runs: Sequence[Run], dataset: str, base: str, adv: str
                         ) -> list[tuple[int, float | None]]:
  """Per seed: max |difference| of the logged pre-training metrics of `adv` and `base`.

  The adversarial models are their base model plus fine-tuning; with the same seed their
  pre-training must be the very same computation. 0.0 means the logs agree exactly.
  Rows are compared where both runs logged the same window of steps: a run stopped by
  Ctrl-C or SIGTERM logs the steps since its last row, and its next row covers fewer.
  """
  def windows(run: Run) -> dict[tuple[int, int], dict]:
    rows, _ = _phase_rows(run)
    starts = [0] + [int(h['step']) for h in rows[:-1]]
    return {(s, int(h['step'])): h for s, h in zip(starts, rows)}

  out = []
  for rb in _by(runs, dataset, base):
    ra = [r for r in _by(runs, dataset, adv) if r.seed == rb.seed]
    if not ra:
      continue
    if not rb.history or not ra[0].history:  # a run not started: nothing to compare
      out.append((rb.seed, None))
      continue
    byb = windows(rb)
    diffs = []
    for window, h in windows(ra[0]).items():
      g = byb.get(window)
      if g is None:
        continue
      for k in ('loss', 'rec', 'kl', 'mse', 'tc'):
        if k in h and k in g:
          diffs.append(abs(h[k] - g[k]))
    out.append((rb.seed, max(diffs) if diffs else None))
  return out


# ---------------------------------------------------------------------------------------
# Figures.


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


COLORS = {'vae': '#1f77b4', 'avae': '#ff7f0e', 'vae_s': '#2ca02c', 'avae_s': '#d62728'}


def _series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
  rows = [h for h in run.history if key in h]
  return (np.array([h['step'] for h in rows], np.float64),
          np.array([h[key] for h in rows], np.float64))


def plot_losses(runs: Sequence[Run], dataset: str, variants: Sequence[str], path: str) -> bool:
  """Plots loss components against steps: a line per run, a colour per model.

  Each model's lowest logged seed is drawn thick. Returns False, writing nothing, when no
  run logged a loss.
  """
  thick = {v: r.seed for v, r in lowest_logged(runs, dataset, variants).items()}
  keys = [k for k in ('loss', 'rec', 'mse', 'mae', 'dssim', 'sobel', 'gabor', 'kl', 'tc')
          if any(any(k in h for h in r.history) for r in runs if r.dataset == dataset)]
  if not keys:
    return False
  plt = _plt()
  ncol = 3
  nrow = math.ceil(len(keys) / ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
  pre = None
  for ax, key in zip(axes.flat, keys):
    for v in variants:
      for r in _by(runs, dataset, v):
        x, y = _series(r, key)
        if x.size == 0:
          continue
        pre = pre or _pretrain_steps(r)
        first = r.seed == thick.get(v)
        # Dashed for the adversarial models: their pre-training lies on their base model's.
        ax.plot(x, y, color=COLORS[v], lw=1.4 if first else 0.6,
                ls='--' if v.startswith('avae') else '-', alpha=1.0 if first else 0.5,
                label=NAMES[v] if first else None)
    if pre:
      ax.axvline(pre, color='0.5', ls=':', lw=0.8)
    ax.set_title(key if key != 'rec' else 'rec (weighted L_REC per pixel)', fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    ys = [h[key] for r in runs if r.dataset == dataset for h in r.history if key in h]
    if ys and min(ys) > 0 and max(ys) > 10 * min(ys):
      ax.set_yscale('log')
  for ax in list(axes.flat)[len(keys):]:
    ax.axis('off')
  if axes.flat[0].get_legend_handles_labels()[0]:
    axes.flat[0].legend(fontsize=7)
  fig.suptitle(f'{dataset}: loss components per logged window (thick: {_seed_words(thick)}; '
               'dashed: AVAE/AVAE-S; dotted line: end of pre-training)', fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.96))
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def plot_adversarial(runs: Sequence[Run], dataset: str, variants: Sequence[str],
                     path: str) -> bool:
  """Discriminator accuracy, gated update rates and adversarial losses of the fine-tuning."""
  adv_vs = [v for v in variants if v.startswith('avae')]
  thick = {v: r.seed for v, r in lowest_logged(runs, dataset, adv_vs, 'disc_accuracy').items()}
  keys = ('disc_accuracy', 'disc_updated', 'vae_updated', 'disc_loss', 'gen_loss')
  if not any(any('disc_accuracy' in h for h in r.history)
             for r in runs if r.dataset == dataset and r.variant in adv_vs):
    return False
  plt = _plt()
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
  titles = {'disc_accuracy': 'discriminator accuracy (gates at 0.5, 0.7)',
            'disc_updated': 'share of steps D was updated',
            'vae_updated': 'share of steps the VAE was updated',
            'disc_loss': 'discriminator BCE', 'gen_loss': '−log D(x̃)'}
  for ax, key in zip(axes.flat, keys):
    for v in adv_vs:
      for r in _by(runs, dataset, v):
        x, y = _series(r, key)
        first = r.seed == thick.get(v)
        if x.size:
          ax.plot(x, y, color=COLORS[v], lw=1.4 if first else 0.6, alpha=1.0 if first else 0.5,
                  label=NAMES[v] if first else None)
    if key == 'disc_accuracy':
      for t in (0.5, 0.7):
        ax.axhline(t, color='0.5', ls=':', lw=0.8)
    if key in ('disc_accuracy', 'disc_updated', 'vae_updated'):
      ax.set_ylim(-0.05, 1.05)
    ax.set_title(titles[key], fontsize=8)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
  handles, labels = axes.flat[0].get_legend_handles_labels()
  if handles:
    axes.flat[0].legend(fontsize=7)
  fig.suptitle(f'{dataset}: adversarial fine-tuning (per logged window; thick: '
               f'{_seed_words(thick)})', fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.92))
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def copy_model_figures(runs: Sequence[Run], dataset: str, variants: Sequence[str],
                       fig_dir: str) -> tuple[dict[tuple[str, str], str], dict[str, int]]:
  """Copies the evaluation figures of each model's lowest finished seed.

  Returns the figures' paths and those seeds.
  """
  out, seeds = {}, {}
  for v in variants:
    done = _by(runs, dataset, v, finished=True)
    if not done:
      continue
    r = done[0]
    seeds[v] = r.seed
    for name in FIGURES:
      src = os.path.join(r.workdir, config_lib.EVAL_DIR, f'{name}.png')
      if os.path.exists(src):
        rel = os.path.join(FIGURE_DIR, dataset, f'{v}_{name}.png')
        os.makedirs(os.path.dirname(os.path.join(fig_dir, rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(fig_dir, rel))
        out[(v, name)] = rel
  return out, seeds


# ---------------------------------------------------------------------------------------
# The report.


def _traversal_words(runs: Sequence[Run], dataset: str, shown: Mapping[str, int]) -> str:
  """'from −R to R', R the eval.traversal_range of the runs whose figures are shown."""
  ranges = sorted({float(r.config.get('eval', {}).get('traversal_range', math.nan))
                   for r in runs if r.dataset == dataset and shown.get(r.variant) == r.seed
                   and r.config})
  ranges = [x for x in ranges if not math.isnan(x)]
  if len(ranges) == 1:
    return f'from −{ranges[0]:g} to {ranges[0]:g}'
  # Runs of one study share the range; runs gathered from several may not.
  return 'from −R to R (R: eval.traversal_range' + ''.join(f', {x:g}' for x in ranges) + ')'


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return '-'
  seconds = float(seconds)
  h, rem = divmod(int(round(seconds)), 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def _settings_table(settings: Any, datasets: Sequence[str]) -> str:
  fields = [('dataset', 'dataset'), ('image size × channels', None), ('model.widths', 'widths'),
            ('latent dims', 'latent_dim'), ('FC width (Table I: 48)', 'hidden_dim'),
            ('training images', None), ('batch size', 'batch_size'),
            ('pre-training steps (all four models)', 'pretrain_steps'),
            ('adversarial steps (AVAE, AVAE-S)', 'adversarial_steps'),
            ('evaluation images (every metric but MIG, and FID)', 'eval_num_images'),
            ('calibration batches', 'calibrate_batches'), ('FID', 'fid')]
  lines = ['| setting | ' + ' | '.join(datasets) + ' |', '|---|' + '---|' * len(datasets)]
  for label, key in fields:
    cells = []
    for d in datasets:
      s = settings[d]
      if label.startswith('image size'):
        cells.append(f'{s.image_size}×{s.image_size}×{s.channels}')
      elif label == 'training images':
        cells.append(str(_num_train(s)))
      else:
        val = s[key]
        cells.append(str(tuple(val)) if isinstance(val, (list, tuple)) else str(val))
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _num_train(s: Any) -> int:
  """Training images of a dataset's settings (configs/study.py)."""
  return s.num_train if s.dataset == 'shapes' else FASHION_MNIST_TRAIN


def _epochs(settings: Any, dataset: str) -> float:
  s = settings[dataset]
  return s.pretrain_steps * s.batch_size / _num_train(s)


def _claim_sentence(c: Claim, r: dict[str, Any]) -> str:
  if r['n'] == 0:
    return f'- {c.text}: not measured.'
  paper = f' (paper: {_signed_pct(r["paper_rel"])})' if 'paper_rel' in r else ''
  return (f'- {c.text}: **{r["verdict"]}**; {fmt(r["a_mean"])} vs {fmt(r["b_mean"])}, '
          f'{_signed_pct(r["rel"])}{paper}, paired Δ = {fmt(r["diff_mean"], 3)}'
          f'{_pm(r["diff_sd"])}{" (sd)" if r["n"] > 1 else ""} over {r["n"]} seed(s).')


# Each diagnostic gives (markdown lines, warnings raised, checks it could not make).
_Section = tuple[list[str], list[str], list[str]]


def _gating_section(runs: Sequence[Run], dataset: str, variants: Sequence[str]) -> _Section:
  """How often each gated update ran, per adversarial run; a side stuck below 5% warns."""
  adv_vs = [v for v in variants if v.startswith('avae')]
  lines, warnings, unchecked = [], [], []
  if not adv_vs:
    return lines, warnings, unchecked
  lines += ['**Gating (Algorithm 1).** Share of adversarial steps in which each update ran; '
            'D is updated when its accuracy < 0.7, the VAE when it is > 0.5.', '',
            '| model | seed | adv. steps | D updated | VAE updated | D accuracy: first window '
            '→ last (mean) | −log D(x̃) last | D BCE last |',
            '|---|---|---|---|---|---|---|---|']
  for v in adv_vs:
    for r in _by(runs, dataset, v):
      g = gating_stats(r)
      if not g:
        if r.finished:
          unchecked.append(f'{dataset} {NAMES[v]} seed {r.seed}: gating (no adversarial '
                           'steps logged)')
        continue
      lines.append(
          f'| {NAMES[v]} | {r.seed} | {g["steps"]} | {_share_pct(g["disc_updated"])} | '
          f'{_share_pct(g["vae_updated"])} | {fmt(g["acc_first"], 3)} → {fmt(g["acc_last"], 3)} '
          f'({fmt(g["acc_mean"], 3)}) | {fmt(g["gen_loss_last"], 3)} | '
          f'{fmt(g["disc_loss_last"], 3)} |')
      for side in ('disc_updated', 'vae_updated'):
        if g[side] is not None and g[side] < 0.05:
          warnings.append(f'{dataset} {NAMES[v]} seed {r.seed}: {side} ran in only '
                          f'{_share_pct(g[side])} of the adversarial steps (gating stuck)')
  lines.append('')
  return lines, warnings, unchecked


_PIXEL_SUM = 'H·W·C'  # loss.reconstruction_scale 0: per-pixel means become sums


def _weight_words(cfg: Mapping[str, Any] | None) -> tuple[str, str]:
  """L_REC's scale and λ_adv as the report names them, from a run's config."""
  scale = config_lib.configured_reconstruction_scale(cfg or {})
  lam = _loss_weight(cfg or {}, 'adversarial_weight')
  return (f'{scale:g}' if scale else _PIXEL_SUM), f'{lam:g}'


def _loss_scale_section(runs: Sequence[Run], dataset: str,
                        variants: Sequence[str]) -> _Section:
  """Each term's size in the objective, from each model's lowest seed that logged one."""
  logged = lowest_logged(runs, dataset, variants)
  shown = {v: r.seed for v, r in logged.items()}
  rec, lam = _weight_words(next(iter(logged.values())).config if logged else None)
  lines = ['**Size of each term** as it enters the objective (last logged window of each '
           f'phase, {_seed_words(shown) if shown else "no run logged one"}): L_REC is '
           f'multiplied by {rec}; the adversarial term is λ_adv·(−log D(x̃)) with '
           f'λ_adv = {lam}.',
           '', '| model | phase | scale·L_REC | of which scale·MSE | KL | TC | '
           'λ_adv·(−log D) | adv. share of the VAE objective |',
           '|---|---|---|---|---|---|---|---|']
  for v, run in logged.items():
    for phase, row in loss_scales(run).items():
      lines.append(f'| {NAMES[v]} | {phase} | {fmt(row["scaled_rec"])} | '
                   f'{fmt(row["scaled_mse"])} | {fmt(row.get("kl"))} | '
                   f'{fmt(row.get("tc")) if "tc" in row else "-"} | '
                   f'{fmt(row.get("adv")) if "adv" in row else "-"} | '
                   f'{_share_pct(row["adv_share"]) if "adv" in row else "-"} |')
  lines.append('')
  return lines, [], []


def _posterior_section(runs: Sequence[Run], dataset: str,
                       variants: Sequence[str]) -> _Section:
  """Active latent dimensions and KL per dimension; one active dimension or none warns."""
  lines = [f'**Posterior.** KL per latent dimension on the evaluation images; a dimension '
           f'is active when Var_x(E[z_j|x]) > {ACTIVE_THRESHOLD} (Burda et al. 2016). '
           'Few active dimensions would mean posterior collapse.', '']
  warnings, unchecked = [], []
  rows, shown = [], {}
  for v in variants:
    stats = [(r, posterior_stats(r)) for r in _by(runs, dataset, v, finished=True)]
    for r, s in stats:
      if not s or 'active' not in s:
        unchecked.append(f'{dataset} {NAMES[v]} seed {r.seed}: posterior collapse '
                         f'({(s or {}).get("error", "no statistics")})')
    stats = [(r, s) for r, s in stats if s and 'active' in s]
    if not stats:
      continue
    act = ', '.join(f'{s["active"]}/{s["latent_dim"]}' for _, s in stats)
    kls = [float(np.sum(s['kl_per_dim'])) for _, s in stats]
    top = sorted(stats[0][1]['kl_per_dim'], reverse=True)[:6]
    shown[v] = stats[0][0].seed
    rows.append(f'| {NAMES[v]} | {act} | {fmt_ms(kls)} | '
                + ', '.join(f'{x:.2f}' for x in top) + ' |')
    for r, s in stats:
      if s['active'] <= 1:
        warnings.append(f'{dataset} {NAMES[v]} seed {r.seed}: {s["active"]} active latent '
                        'dimension(s): posterior collapse')
  top_of = f' ({_seed_words(shown)})' if shown else ''
  lines += [f'| model | active dims (per seed) | KL total (nats) | largest KL per dim{top_of} |',
            '|---|---|---|---|', *rows, '']
  return lines, warnings, unchecked


# Each adversarial model and the base model whose pre-training it repeats.
_PAIRS = (('vae', 'avae'), ('vae_s', 'avae_s'))


def _identity_section(runs: Sequence[Run], dataset: str,
                      variants: Sequence[str]) -> _Section:
  """Whether each adversarial model's pre-training logged what its base model's did."""
  ident, warnings, unchecked = [], [], []
  for base, adv in _PAIRS:
    if base in variants and adv in variants:
      for seed, diff in pretraining_identity(runs, dataset, base, adv):
        ident.append(f'{NAMES[adv]} vs {NAMES[base]} seed {seed}: '
                     + ('identical logs' if diff == 0.0 else f'max |Δ| = {fmt(diff, 3)}'
                        if diff is not None else 'no overlap'))
        if diff is None:
          unchecked.append(f'{dataset}: pre-training of {NAMES[adv]} seed {seed} against '
                           f'{NAMES[base]} (no window of steps logged by both)')
        if diff:
          warnings.append(f'{dataset}: pre-training of {NAMES[adv]} seed {seed} differs from '
                          f'{NAMES[base]} (max |Δ| {fmt(diff, 3)})')
  if not ident:
    return [], warnings, unchecked
  return (['**Pre-training shared?** The adversarial models are trained in their own '
           'workdirs; with the same seed their pre-training is the same computation as '
           'their base model\'s, so the logged pre-training losses must agree: '
           + '; '.join(ident) + '.', ''], warnings, unchecked)


def _sharpness_section(runs: Sequence[Run], dataset: str,
                       variants: Sequence[str]) -> _Section:
  """Which models' reconstructions are sharper than the data (seed by seed)."""
  gt = ground_truth_by_seed(runs, dataset, 'gt_sharpness_mean')
  if not gt:
    return [], [], []
  over = []
  for v in variants:
    m, _, n = mean_sd(_metric(r, 'rec_sharpness_mean') - gt[r.seed]
                      for r in _by(runs, dataset, v)
                      if r.seed in gt and _finite(_metric(r, 'rec_sharpness_mean')))
    if n and m > 0:
      over.append(NAMES[v])
  gt_text = _fmt_ground_truth(gt, " over the seeds' eval sets")
  return (['**Sharpness against the data.** Ground-truth sharpness '
           f'{gt_text}; ' + (f'reconstructions sharper than the data: '
                             f'{", ".join(over)} (high-frequency artefacts, not '
                             'detail).' if over else
                             'no model\'s reconstructions are sharper than the data, '
                             'so "sharper" here means closer to the data.'), ''], [], [])


def _diagnostics(runs: Sequence[Run], dataset: str,
                 variants: Sequence[str]) -> tuple[str, list[str], list[str]]:
  """The diagnostics section of one dataset, its warnings and the checks it could not make.

  The last are listed so that the findings never report a check as passed that did not run.
  """
  # The gating and posterior checks read finished runs only.
  unfinished = [f'{NAMES[v]} seed {r.seed}' for v in variants for r in _by(runs, dataset, v)
                if not r.finished]
  unchecked = [f'{dataset}: gating and posterior collapse of the unfinished run(s) '
               + ', '.join(unfinished)] if unfinished else []
  lines, warnings = [], []
  for section in (_gating_section, _loss_scale_section, _posterior_section,
                  _identity_section, _sharpness_section):
    more_lines, more_warnings, more_unchecked = section(runs, dataset, variants)
    lines += more_lines
    warnings += more_warnings
    unchecked += more_unchecked
  return '\n'.join(lines), warnings, unchecked


def _share_pct(x: float | None) -> str:
  """A share as a percentage; small shares keep two significant digits."""
  if x is None or not np.isfinite(x):
    return '-'
  p = 100 * x
  return f'{p:.0f}%' if abs(p) >= 10 or p == 0 else f'{p:.2g}%'


def _reasons(runs: Sequence[Run], dataset: str, settings: Any) -> list[str]:
  """Likely reasons, each backed by a number from the diagnostics.

  Each quotes its model's lowest finished seed and names it: in a partial study that can
  be another seed than the loss-scale table's (the lowest one that logged a window).
  """
  out = []
  s = settings[dataset]
  out.append(f'Budget: {s.pretrain_steps} pre-training steps ({_epochs(settings, dataset):.2f} '
             f'epochs) and {s.adversarial_steps} adversarial steps at batch {s.batch_size}; '
             'the paper pre-trained 100 epochs of CelebA (96×96) and does not give the '
             "fine-tuning's length (configs/celeba.py: 10 epochs).")
  for v in ('avae', 'avae_s'):
    rs = _by(runs, dataset, v, finished=True)
    if not rs:
      continue
    sc = loss_scales(rs[0]).get('adversarial')
    g = gating_stats(rs[0])
    if sc and 'adv' in sc:
      rec, lam = _weight_words(rs[0].config)
      out.append(f'{NAMES[v]} (seed {rs[0].seed}): the adversarial term λ_adv·(−log D) = '
                 f'{fmt(sc["adv"], 3)} is {_share_pct(sc["adv_share"])} of the objective next to '
                 f'scale·L_REC + KL{" + γ·TC" if sc.get("tc") else ""} = '
                 f'{fmt(sc["vae_terms"], 4)} '
                 f'(λ_adv = {lam}, L_REC '
                 f'{"summed over pixels" if rec == _PIXEL_SUM else f"times {rec}"}); '
                 f'the VAE was updated in {_share_pct(g.get("vae_updated"))} and D in '
                 f'{_share_pct(g.get("disc_updated"))} of the adversarial steps.')
  rs_s = _by(runs, dataset, 'vae_s', finished=True)
  rs_v = _by(runs, dataset, 'vae', finished=True)
  if rs_s:
    sc = loss_scales(rs_s[0]).get('pretrain')
    if sc and sc.get('scaled_mse'):
      k = sc['scaled_rec'] / sc['scaled_mse']
      kl_weight = _loss_weight(rs_s[0].config or {}, 'kl_weight')
      kl_s = mean_sd(_metric(r, 'kl_mean') for r in rs_s)[0]
      kl_v = mean_sd(_metric(r, 'kl_mean') for r in rs_v)[0] if rs_v else float('nan')
      out.append(f'VAE-S (seed {rs_s[0].seed}): its calibrated L_REC is {k:.1f}× its own MSE '
                 'term at the end of pre-training (five terms, each brought to the MSE\'s '
                 'scale), so against the '
                 f'KL it acts like a VAE with β ≈ {kl_weight:g}/{k:.1f}: KL {fmt(kl_s)} nats vs '
                 f'{fmt(kl_v)} for VAE (means over {len(rs_s)} and {len(rs_v)} finished '
                 'seed(s)).' + _weaker_kl_sentence(k, kl_s, kl_v))
  return out


def _weaker_kl_sentence(k: float, kl_s: float, kl_v: float) -> str:
  """What VAE-S's KL against VAE's says of its calibrated L_REC's weight (k x the MSE's).

  A VAE with β < 1 keeps more nats in its posterior: only a larger KL shows that effect.
  """
  if not (math.isfinite(kl_s) and math.isfinite(kl_v)):
    return ''
  if kl_s <= kl_v:
    return (f' Its KL is not above VAE\'s here, so the data do not show '
            f'{"this weaker KL" if k > 1 else "a weaker KL"} at work.')
  if k > 1:
    return (' Part of any VAE-S gain may come from this weaker KL rather than from the '
            'structure-aware terms themselves.')
  return ''  # a larger KL, but under a β of at least the KL weight: no weaker KL to blame


def _dataset_section(runs: Sequence[Run], d: str, variants: Sequence[str], settings: Any,
                     out: str) -> tuple[str, list[tuple[Claim, dict]], list[str], list[str]]:
  """Dataset d's part of the report, its claims' results, the defect checks fired and unmade."""
  lines = []
  side = int(settings[d].image_size)
  size = f'{side}×{side}' + (' RGB' if int(settings[d].channels) == 3 else '')
  lines.append('## ' + DATASET_NAMES.get(d, d + ' ({size})').format(size=size))
  lines.append('')
  n_done = {v: sum(r.finished for r in _by(runs, d, v)) for v in variants}
  lines.append('### Table III on ' + d)
  lines.append('')
  lines.append('Mean ± standard deviation over seeds (seeds per model: ' + ', '.join(
      f'{NAMES[v]} {n_done[v]}' for v in variants) + '). Reconstructions are decode(μ) of '
      'the first evaluation images, samples decode(z) with z ~ N(0, I); sharpness is the '
      'variance of the Laplacian of the luma (higher = sharper); FID against the same '
      'real images, the same count for every model.')
  lines.append('')
  lines.append(table_iii(runs, d, variants))
  fm = [r.metrics for r in runs if r.dataset == d and r.finished]
  if fm:
    m0 = fm[0]
    note = (f'Images per metric: {m0.get("num_images")}; ' +
            (f'FID over {m0.get("fid_num_images")} real images against as many '
             'reconstructions and as many samples.' if 'fid_num_images' in m0 else
             f'FID skipped: {m0.get("fid_skipped", "not computed")}.'))
    if 'mig' in m0:
      note += (f' MIG over {m0.get("mig_num_images")} images '
               f'({config_lib.MIG_BINS} bins); shuffling each '
               'dimension of the codes across the images gives the plug-in estimate\'s '
               'floor at that count.')
    lines.append(note)
    lines.append('')
  lines.append('### The paper\'s orderings on ' + d)
  lines.append('')
  lines.append('Paired by seed (AVAE seed k is VAE seed k fine-tuned; VAE-S seed k shares '
               'VAE seed k\'s initialisation and batches). "paper, CelebA" is the relative '
               'change in the paper\'s Table III. A claim "holds (every seed)" when every '
               'seed\'s difference points the paper\'s way, and is "mixed" when the seeds '
               'disagree; ± is the standard deviation of the per-seed differences.')
  lines.append('')
  table, results = claims_table(runs, d)
  lines.append(table)
  lines.append('### Checks before believing a failed claim (' + d + ')')
  lines.append('')
  diag, warns, unchecked = _diagnostics(runs, d, variants)
  lines.append(diag)
  lines.append('### Likely reasons, with the numbers behind them (' + d + ')')
  lines.append('')
  lines += ['- ' + x for x in _reasons(runs, d, settings)]
  lines.append('')
  # Figures.
  figs, shown = copy_model_figures(runs, d, variants, out)
  lines.append(f'### Figures ({d}, {_seed_words(shown) if shown else "no finished run"})')
  lines.append('')
  lines.append('Reconstructions: ground truth above its reconstruction. Samples: decode(z), '
               'z ~ N(0, I). Interpolations: linear in z between two encoded images (the '
               'images at the row ends). Traversals: one latent dimension per row (largest KL '
               f'first), {_traversal_words(runs, d, shown)} around the first image\'s code.')
  lines.append('')
  lines.append('| | ' + ' | '.join(NAMES[v] for v in variants) + ' |')
  lines.append('|---|' + '---|' * len(variants))
  for name in FIGURES:
    cells = [f'![{NAMES[v]} {name}]({figs[(v, name)]})' if (v, name) in figs else '-'
             for v in variants]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  curves = os.path.join(FIGURE_DIR, d, 'training_losses.png')
  os.makedirs(os.path.join(out, FIGURE_DIR, d), exist_ok=True)
  lines.append(f'### Training curves ({d})')
  lines.append('')
  if plot_losses(runs, d, variants, os.path.join(out, curves)):
    lines.append(f'![{d} loss components]({curves})')
    lines.append('')
  adv = os.path.join(FIGURE_DIR, d, 'training_adversarial.png')
  if plot_adversarial(runs, d, variants, os.path.join(out, adv)):
    lines.append(f'![{d} adversarial fine-tuning]({adv})')
    lines.append('')
  lines.append(f'### Every run ({d})')
  lines.append('')
  lines.append(per_seed_table(runs, d, variants))
  return '\n'.join(lines), results, warns, unchecked


def _header(runs: Sequence[Run], settings: Any, study: Mapping[str, Any],
            calib: Mapping[str, Any], host: Mapping[str, Any] | None) -> list[str]:
  """The title, what made the report and at what cost, the host, and unfinished runs."""
  datasets = setting_list(settings, 'datasets')
  variants = setting_list(settings, 'variants')
  finished = [r for r in runs if r.finished]
  walls = [wall_time(r.info) for r in runs]
  train_s = sum(w for w, _ in walls)
  # Killed sessions and sessions in progress count to their last record only.
  at_least = 'at least ' if any(lower for _, lower in walls) else ''
  calib_s = sum(float(c.get('wall_s') or 0.0) for c in calib.values())
  commands = (study.get('commands')
              or [f'python study.py --out=DIR --budget={settings.budget}'])
  runs_by = ' and '.join(f'`{c}`' for c in commands)
  made = f'Generated by {runs_by}'
  report_command = study.get('report_command')
  if report_command and report_command not in commands:
    made = f'Runs by {runs_by}; this report by `{report_command}`'
  lines = ['# Reproduction study: VAE, AVAE, VAE-S and AVAE-S', '',
           f'{made} (budget `{settings.budget}`, configs/study.py) on '
           f'{datetime.date.today().isoformat()}. {len(finished)} of {len(runs)} runs '
           f'finished ({len(datasets)} dataset(s) × {len(variants)} models × '
           f'{int(settings.seeds)} seed(s)); training and evaluation took '
           f'{at_least}{_duration(train_s)} in total, calibration {_duration(calib_s)}.']
  if host:
    lines.append(f'Host: {host.get("cpu_count")} CPU cores, {host.get("backend")} backend, '
                 f'devices {", ".join(host.get("devices", []))}, jax {host.get("jax")}, '
                 f'Python {host.get("python")}.')
  threads = sorted({r.info['cpu_threads'] for r in runs if 'cpu_threads' in r.info})
  if threads:
    lines.append(f'XLA:CPU thread counts of the runs: {", ".join(map(str, threads))} (to '
                 'repeat a run bit for bit, give it as many: README, Devices and '
                 'reproducibility).')
  lines.append('')
  missing = [r for r in runs if not r.finished]
  if missing:
    lines += ['**Incomplete study.** Runs without final metrics: ' + ', '.join(
        f'{r.dataset}/{r.variant}/seed{r.seed} ({run_status(r).splitlines()[0][:80]})'
        for r in missing) + '. Means below are over the seeds that finished.', '']
  return lines


def _findings(results: Mapping[str, list[tuple[Claim, dict]]], warnings: Sequence[str],
              unchecked: Sequence[str], variants: Sequence[str]) -> list[str]:
  """Each dataset's claims as sentences, then which defect checks fired or were not made."""
  lines = ['## Findings', '']
  for d, claim_results in results.items():
    lines += [f'**{d}**', '', *[_claim_sentence(c, r) for c, r in claim_results], '']
  if warnings:
    lines.append('**Defect checks that fired:** ' + '; '.join(warnings) + '.')
  elif unchecked:
    lines.append('**Defect checks:** none fired among those that could be made.')
  else:
    # Only the checks these models allow: a report of VAE and VAE-S has no gating, and
    # one without a base model and its adversarial model no shared pre-training.
    passed = []
    if any(v.startswith('avae') for v in variants):
      passed.append('no gating stuck on one side (each gated update ran in ≥ 5% of the '
                    'adversarial steps)')
    passed.append('no posterior collapse (> 1 active latent dimension)')
    pairs = [(b, a) for b, a in _PAIRS if a in variants and b in variants]
    if pairs:
      passed.append(f'pre-training of {"/".join(NAMES[a] for _, a in pairs)} identical to '
                    f'{"/".join(NAMES[b] for b, _ in pairs)}')
    lines.append('**Defect checks:** ' + ', '.join(passed) + ' (see the checks per dataset).')
  if unchecked:
    lines += ['', '**Defect checks not made:** ' + '; '.join(unchecked) + '.']
  lines.append('')
  return lines


def _calibration_section(calib: Mapping[str, Any]) -> list[str]:
  """How the λ's were found (the paper's words, then ours) and each dataset's values."""
  lines = ['## λ\'s and their calibration', '',
           'The paper: "we did not tune the hyper-parameters … the only thing we did was to '
           'make all loss components to be in the same scale … We probed the loss components '
           'for 1 epoch and determined the weights and used those weights in all the '
           'experiments thereafter." Here, once per dataset, a throwaway copy of seed 0\'s '
           'initial VAE-S trains for K batches with every reconstruction term at weight 1 '
           '(trainer.calibrate_weights, the trainer\'s own calibration); λ_i = mean(L_MSE) / '
           'mean(L_i) over those batches (λ_MSE = 1). Every seed of VAE-S and AVAE-S then uses '
           'these λ\'s (calibrate.enabled=False in each run, weights in its config.json). '
           'VAE and AVAE use the MSE alone. β (KL) = 1, γ (TC) = 1, λ_adv = 1; '
           'L_REC is multiplied by H·W·C (a sum over pixels).', '']
  if calib:
    terms = config_lib.RECONSTRUCTION_TERMS
    lines += ['| dataset | K batches (batch size) | ' + ' | '.join(f'λ {t}' for t in terms)
              + ' |', '|---|---|' + '---|' * len(terms)]
    for d, c in calib.items():
      w = c['weights']
      lines.append(f'| {d} | {c.get("batches")} ({c.get("batch_size")}) | '
                   + ' | '.join(fmt(w.get(t), 4) for t in terms) + ' |')
    lines.append('')
  return lines


def _settings_section(runs: Sequence[Run], settings: Any, datasets: Sequence[str]) -> list[str]:
  """The settings table, one full trainer config per dataset, and how to rerun."""
  lines = ['## Settings', '',
           'Identical for the four models of a dataset (only `variant` differs, and `seed` '
           'between seeds). The adversarial models train their pre-training steps and then '
           'their adversarial steps, in their own workdirs.', '',
           _settings_table(settings, datasets)]
  for d in datasets:
    cfgs = [r for r in runs if r.dataset == d and r.config]
    cfg = next((r for r in cfgs if r.variant == 'avae_s'), cfgs[0] if cfgs else None)
    if cfg is None:
      continue
    lines += [f'<details><summary>Full trainer config of {d} / {NAMES[cfg.variant]} / seed '
              f'{cfg.seed} (config.json)</summary>', '', '```json',
              json.dumps(cfg.config, indent=1, sort_keys=True), '```', '', '</details>', '']
  lines += [f'Rerun: `python study.py --out=DIR --budget={settings.budget} '
            f'--seeds={settings.seeds} --datasets={",".join(datasets)}`; rerunning on the '
            'same DIR skips finished runs and resumes the others. `--report_only` rewrites '
            'this report from DIR.', '']
  return lines


def write_report(out: str, settings: Any, notes_path: str | None = None,
                 host: dict[str, Any] | None = None) -> str:
  """Writes OUT/results.md and OUT/results/*.png from the study's runs; returns the path."""
  datasets = setting_list(settings, 'datasets')
  variants = setting_list(settings, 'variants')
  runs = load_runs(out, datasets, variants, int(settings.seeds))
  fig_root = os.path.join(out, FIGURE_DIR)
  if os.path.isdir(fig_root):
    shutil.rmtree(fig_root)
  os.makedirs(fig_root, exist_ok=True)
  calib = {}
  for d in datasets:
    c = _read_json(os.path.join(out, d, CALIBRATION_FILE))
    if c:
      calib[d] = c

  results: dict[str, list[tuple[Claim, dict]]] = {}
  warnings: list[str] = []
  unchecked: list[str] = []
  sections: list[str] = []
  for d in datasets:
    section, results[d], warns, not_made = _dataset_section(runs, d, variants, settings, out)
    sections.append(section)
    warnings += warns
    unchecked += not_made

  lines = _header(runs, settings, _read_json(os.path.join(out, STUDY_FILE)) or {}, calib,
                  host)
  lines += _findings(results, warnings, unchecked, variants)  # findings first
  if notes_path and os.path.exists(notes_path):
    with open(notes_path) as f:
      lines += ['## Discussion', '', f.read().strip(), '']
  lines += sections
  lines += _calibration_section(calib)
  lines += _settings_section(runs, settings, datasets)
  _copy_records(out, runs, datasets)
  path = os.path.join(out, REPORT)
  files.write_text(path, '\n'.join(lines))
  return path


def _copy_records(out: str, runs: Sequence[Run], datasets: Sequence[str]) -> None:
  """Copies the files the report was made of to OUT/results/runs/, laid out as in OUT.

  Published with the figures, they hold every run's numbers (e.g. FID at each tap and
  seed, which the report's tables average) and remake the report with --report_only.
  """
  names = [STUDY_FILE] + [os.path.join(d, CALIBRATION_FILE) for d in datasets]
  names += [os.path.relpath(os.path.join(r.workdir, f), out) for r in runs for f in RUN_RECORDS]
  for name in names:
    src = os.path.join(out, name)
    if os.path.isfile(src):
      dest = os.path.join(out, FIGURE_DIR, RECORDS_DIR, name)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.copyfile(src, dest)


def published_notes(docs: str) -> str:
  """DOCS/results/discussion.md: the discussion publish() keeps beside the figures."""
  return os.path.join(docs, FIGURE_DIR, 'discussion.md')


def publish_problem(out: str, docs: str) -> str | None:
  """Why publishing OUT to DOCS would delete OUT's own files (None: it would not)."""
  real, docs = os.path.realpath(out), os.path.realpath(docs)
  replaced = os.path.join(docs, FIGURE_DIR)  # deleted, then copied from OUT
  if real == docs or real == replaced or real.startswith(replaced + os.sep):
    where = 'the --publish_dir' if real == docs else f'in {replaced}'
    return (f'--out={out} is {where}, which publishing replaces with the report\'s figures '
            'and records: copy the runs elsewhere first (or --publish=false)')
  return None


def publish(out: str, docs: str, notes_path: str | None = None) -> str:
  """Copies OUT/results.md to DOCS/results.md and OUT/results/ to DOCS/results/.

  The discussion file, if any, is kept beside the figures as DOCS/results/discussion.md,
  so the published report can be regenerated with --notes=docs/results/discussion.md.
  Without one, the discussion published before stays there: someone's writing, which a
  report without notes has no replacement for. Raises ValueError where DOCS's figures
  folder would replace OUT itself (publish_problem).
  """
  problem = publish_problem(out, docs)
  if problem:
    raise ValueError(problem)
  kept = published_notes(docs)
  notes = None
  if notes_path:
    with open(notes_path) as f:
      notes = f.read()
  elif os.path.exists(kept):
    with open(kept) as f:
      notes = f.read()
  os.makedirs(docs, exist_ok=True)
  dest_figs = os.path.join(docs, FIGURE_DIR)
  if os.path.isdir(dest_figs):
    shutil.rmtree(dest_figs)
  shutil.copytree(os.path.join(out, FIGURE_DIR), dest_figs)
  if notes is not None:
    files.write_text(kept, notes)
  dest = os.path.join(docs, REPORT)
  shutil.copyfile(os.path.join(out, REPORT), dest)
  return dest
