"""Default config: AVAE-S on the procedural `shapes` dataset, offline, minutes on a CPU."""

import ml_collections


def get_config(variant: str = 'avae_s') -> ml_collections.ConfigDict:
  """The offline default configuration for `variant`; every other config starts from it."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Which of the paper's four models: 'vae', 'avae', 'vae_s' or 'avae_s'
  # (`--config=configs/default.py:vae`).
  c.variant = variant

  # Data (README: Datasets). `dataset` is a tfds name ('mnist', 'fashion_mnist',
  # 'celeb_a', 'dsprites'), 'shapes', 'folder:PATH' or 'arrays:PATH'.
  c.dataset = 'shapes'
  # tfds data_dir (local folder or gs:// bucket); None = tfds' default. A typed
  # placeholder, so that --config.data_dir=DIR can override it (a plain None cannot be).
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.download = False       # tfds may download only when this is True
  c.image_size = 32
  c.channels = 3
  c.crop_size = 0          # centre square crop (pixels) before resizing; 0 = the largest
  c.train_split = 'train'
  c.eval_split = 'test'
  c.eval_fraction = 0.05   # held-out share for folder:/arrays:/dsprites data without splits
  c.shapes = ml_collections.ConfigDict()
  c.shapes.num_train = 8192
  c.shapes.num_eval = 1024

  # Model (Table I), sized by config.
  c.model = ml_collections.ConfigDict()
  c.model.widths = (16, 32, 64)
  c.model.latent_dim = 32
  c.model.hidden_dim = 48
  c.model.bn_momentum = 0.9
  c.model.dtype = 'float32'  # compute dtype; 'bfloat16' for TPU/GPU (params stay float32)
  # Convolutions' backward pass: 'custom' (strided input gradients by phase, stride-1
  # gradients in the forward form; avae_jax/conv.py), 'xla', or 'auto' (custom on the CPU
  # only).
  c.model.conv_backward = 'auto'

  # Loss (README: The four models). The reconstruction weights are used by 'vae_s'/'avae_s';
  # 'vae'/'avae' use MSE alone.
  c.loss = ml_collections.ConfigDict()
  c.loss.weights = ml_collections.ConfigDict(
      dict(mae=1.0, mse=1.0, dssim=1.0, sobel=1.0, gabor=1.0))
  # Per-image reconstruction terms are pixel means; multiplied by this scale so
  # they weigh against the KL summed over latent dims. 0 means H*W*C (a sum).
  c.loss.reconstruction_scale = 0.0
  c.loss.kl_weight = 1.0
  c.loss.tc_weight = 1.0        # used by 'vae_s'/'avae_s' only
  c.loss.tc_estimator = 'mss'   # 'mws' or 'mss' (Chen et al. 2018)
  c.loss.adversarial_weight = 1.0
  c.gabor = ml_collections.ConfigDict()
  c.gabor.size = 11
  c.gabor.sigma = 2.5
  c.gabor.wavelengths = (4.0, 8.0)
  c.gabor.orientations = 4

  # Accuracy gating of the adversarial phase (Algorithm 1).
  c.gating = ml_collections.ConfigDict()
  c.gating.train_disc_below = 0.7
  c.gating.train_vae_above = 0.5

  # Optimisation. batch_size is global, across all devices and processes.
  c.batch_size = 64
  c.pretrain_steps = 600
  c.adversarial_steps = 200
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.disc_learning_rate = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999

  # Devices: 0 = all local devices. 'pmap' or 'shard_map'.
  c.num_devices = 0
  c.parallel = 'pmap'
  # CPU backend only: split the host into this many devices (0: one). One per core made
  # 96x96 steps faster on a 2-core CPU, small images slower (docs/benchmarks.md, item 20).
  c.cpu_devices = 0

  # Loss-weight calibration (paper §III): probe each term over K batches first.
  c.calibrate = ml_collections.ConfigDict()
  c.calibrate.enabled = True
  c.calibrate.batches = 20

  # Logging and checkpoints (steps are global: pre-training then adversarial).
  c.log_every = 50
  c.image_every = 400
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  # Several processes agree on a stop signal every so many steps (one process checks
  # every step): a SIGTERM's checkpoint waits for the next of these steps.
  c.stop_check_every = 10

  # Evaluation (eval.py and the end of train.py).
  c.eval = ml_collections.ConfigDict()
  c.eval.num_images = 256        # images for sharpness / MSE / cosine / FID (~1 min on 2 cores)
  # Images for MIG (datasets with factors): 0 = the whole eval split. It needs only their
  # codes, and its estimate is biased upwards on few images.
  c.eval.mig_num_images = 0
  c.eval.batch_size = 128
  # Images per device in one pass of the FID Inception network (299x299), about 32 MB
  # each on a CPU. 8 keeps the default run under 2 GiB and is as fast as 32 on a CPU
  # (docs/benchmarks.md); raise it on a GPU/TPU.
  c.eval.inception_batch_size = 8
  c.eval.fid = True
  c.eval.inception_weights = ''  # path; '' = the cache folder (see README)
  # Keep the Inception features of the evaluated images in the user's cache, for the
  # next evaluation of the same images (README, Evaluation).
  c.eval.cache_real_features = True
  c.eval.grid_size = 8           # images per row in the figures
  c.eval.traversal_dims = 4
  c.eval.traversal_range = 2.5
  return c
