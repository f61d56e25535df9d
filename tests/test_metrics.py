"""Distribution metrics on known inputs and against direct (float64, brute-force) formulas:
Inception Score, precision/recall, KID, CLIP score, reference statistics files, the offline
feature networks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from jaxgen import metrics
from jaxgen.errors import ConfigError, DataError
from jaxgen.metrics import evaluate, features
from jaxgen.metrics.precision_recall import knn_radii


# -- Inception Score ---------------------------------------------------------------------------


def direct_is(probs, splits):
  scores = []
  for p in np.array_split(np.asarray(probs, np.float64), splits):
    py = p.mean(0)
    scores.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_known_values():
  n_classes = 10
  uniform = np.zeros((100, n_classes))
  assert metrics.inception_score(uniform, splits=10) == pytest.approx((1.0, 0.0), abs=1e-12)
  # Confident and evenly spread over the classes (in every split): IS = number of classes.
  confident = np.tile(np.eye(n_classes) * 50.0, (10, 1))
  mean, std = metrics.inception_score(confident, splits=10)
  assert mean == pytest.approx(n_classes, rel=1e-9) and std < 1e-9
  # Confident but always the same class: 1 (no diversity).
  same = np.zeros((40, n_classes))
  same[:, 3] = 50.0
  assert metrics.inception_score(same, splits=4)[0] == pytest.approx(1.0, abs=1e-9)
  # From probabilities: half the samples certain of class 0, half of class 1 -> 2.
  probs = np.repeat(np.eye(2), 5, axis=0)
  assert metrics.inception_score(probs=probs, splits=1)[0] == pytest.approx(2.0, rel=1e-9)


def test_inception_score_matches_direct_formula():
  logits = np.random.default_rng(0).standard_normal((103, 1008)) * 3
  ours = metrics.inception_score(logits, splits=10)
  ref = direct_is(special.softmax(logits, axis=1), 10)
  np.testing.assert_allclose(ours, ref, rtol=1e-10)
  with pytest.raises(ValueError):
    metrics.inception_score(logits, splits=0)
  with pytest.raises(ValueError):
    metrics.inception_score()


# -- precision / recall ------------------------------------------------------------------------


def brute_pr(real, fake, k):
  def radii(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]

  def covered(q, c, r):
    d = np.linalg.norm(q[:, None] - c[None], axis=-1)
    return np.mean(np.any(d <= r[None], axis=1))
  return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_known_inputs():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((64, 16)).astype(np.float32)
  assert metrics.precision_recall(real, real) == (1.0, 1.0)
  far = real + 100.0
  assert metrics.precision_recall(real, far) == (0.0, 0.0)
  # Fake = the real points in a quarter of the square: all realistic, a quarter covered.
  square = rng.random((400, 2))
  p, r = metrics.precision_recall(square, square[square[:, 0] < 0.25])
  assert p == 1.0 and 0.25 <= r < 0.35


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
  rng = np.random.default_rng(k)
  real = rng.standard_normal((70, 8))
  fake = 1.3 * rng.standard_normal((50, 8)) + 0.4
  ours = metrics.precision_recall(real, fake, k=k, block=16)  # Several row blocks.
  assert ours == pytest.approx(brute_pr(real, fake, k), abs=1e-12)
  assert 0.0 < ours[0] < 1.0 and 0.5 < ours[1] <= 1.0  # Not a trivial case.
  radii = knn_radii(real.astype(np.float32), k, block=32)
  want = np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1), axis=1)[:, k] ** 2
  np.testing.assert_allclose(radii, want, rtol=1e-4)


# -- KID ---------------------------------------------------------------------------------------


def direct_mmd2(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, d = x.shape
  k = lambda a, b: (a @ b.T / d + 1) ** 3
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  return ((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
          - 2 * kxy.mean())


def test_kid_matches_direct_formula():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((40, 32)).astype(np.float32)
  fake = (rng.standard_normal((40, 32)) * 1.2 + 0.3).astype(np.float32)
  # One subset of the whole sets: the unbiased MMD^2 itself, deterministic (std 0).
  mean, std = metrics.kernel_inception_distance(real, fake, num_subsets=3, subset_size=40)
  assert mean == pytest.approx(direct_mmd2(real, fake), rel=1e-5) and std < 1e-6
  # Subsets: the mean of the per-subset values, drawn without replacement with the seed.
  mean, std = metrics.kernel_inception_distance(real, fake, num_subsets=5, subset_size=20, seed=3)
  sub = np.random.default_rng(3)
  values = []
  for _ in range(5):
    values.append(direct_mmd2(real[sub.choice(40, 20, replace=False)],
                              fake[sub.choice(40, 20, replace=False)]))
  assert mean == pytest.approx(np.mean(values), rel=1e-5)
  assert std == pytest.approx(np.std(values), rel=1e-4)


def test_kid_same_distribution_near_zero():
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((2, 400, 16)).astype(np.float32)
  same = metrics.kernel_inception_distance(a, b, num_subsets=10, subset_size=200)[0]
  shifted = metrics.kernel_inception_distance(a, b + 0.5, num_subsets=10, subset_size=200)[0]
  assert abs(same) < 0.02 and shifted > 0.2
  with pytest.raises(ValueError):
    metrics.kernel_inception_distance(a[:1], b[:1])


# -- CLIP score --------------------------------------------------------------------------------


def test_clip_score_fixed_vectors():
  e1, e2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
  images = np.stack([e1, e1, e1, 3 * e1, e1])
  texts = np.stack([e1, e2, -e1, 0.5 * e1, np.array([0.5, np.sqrt(3) / 2, 0.0])])
  np.testing.assert_allclose(metrics.clip_scores(images, texts), [100, 0, 0, 100, 50],
                             atol=1e-10)

  # Through embedding callables (any encoder): a lookup of fixed vectors per image and caption.
  captions = ["a one", "a two", "not one", "big one", "sixty degrees"]
  table = dict(zip(captions, texts))
  mean, err = metrics.clip_score(np.arange(5), captions, embed_images=lambda i: images[i],
                                 embed_texts=lambda t: np.stack([table[c] for c in t]),
                                 batch_size=2)
  assert mean == pytest.approx(50.0) and err > 0
  with pytest.raises(ValueError):
    metrics.clip_score(np.arange(2), captions, lambda i: i, lambda t: t)


# -- reference statistics files ----------------------------------------------------------------


def test_statistics_roundtrip_and_pytorch_fid_files(tmp_path):
  f = np.random.default_rng(0).standard_normal((50, 6))
  path = str(tmp_path / "ref.npz")
  metrics.save_statistics(path, f, meta={"net": "digits", "count": 50})
  ref = metrics.load_statistics(path)
  mu, sigma = metrics.feature_statistics(f)
  np.testing.assert_array_equal(ref["mu"], mu)
  np.testing.assert_array_equal(ref["sigma"], sigma)
  np.testing.assert_allclose(ref["features"], f.astype(np.float32))
  assert ref["meta"] == {"net": "digits", "count": 50}
  assert metrics.frechet_distance(ref["mu"], ref["sigma"], mu, sigma) == pytest.approx(0, abs=1e-9)
  # pytorch-fid's --save-stats layout: just mu and sigma.
  np.savez(tmp_path / "pf.npz", mu=mu, sigma=sigma)
  loaded = metrics.load_statistics(str(tmp_path / "pf.npz"))
  assert loaded["features"] is None and loaded["meta"] is None
  np.savez(tmp_path / "bad.npz", m=mu)
  with pytest.raises(DataError, match="no 'mu' and 'sigma'"):
    metrics.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(DataError, match="not found"):
    metrics.load_statistics(str(tmp_path / "missing.npz"))


def test_rfid_of_perfect_reconstruction_is_zero():
  f = np.random.default_rng(2).standard_normal((30, 5))
  assert metrics.feature_frechet_distance(f, f) == pytest.approx(0.0, abs=1e-9)
  assert metrics.feature_frechet_distance(f, f + 1.0) == pytest.approx(5.0, rel=1e-9)


# -- metric names and feature networks ---------------------------------------------------------


def test_metric_names():
  plain, stats = evaluate.parse_metrics("class_accuracy, fid,is,pr_digits,kid_alexnet",
                                        ("class_accuracy",), evaluate.GENERATOR_STATS)
  assert plain == ["class_accuracy"]
  assert stats == [("fd", "inception"), ("is", "inception"), ("pr", "digits"),
                   ("kid", "alexnet")]
  assert [evaluate.result_key(*s) for s in stats] == ["fid", "is", "pr_digits", "kid_alexnet"]
  with pytest.raises(ConfigError, match="unknown metric 'rfd_digits'"):
    evaluate.parse_metrics("rfd_digits", ("class_accuracy",), evaluate.GENERATOR_STATS)
  with pytest.raises(ConfigError, match="unknown metric 'fd_vgg'"):
    evaluate.parse_metrics("fd_vgg", (), evaluate.GENERATOR_STATS)
  assert evaluate.eval_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_alexnet_features():
  net = features.alexnet_net(size=64)
  rng = np.random.default_rng(0)
  grey = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  out = jax.jit(net.fn)(net.variables, grey)["features"]
  assert out.shape == (2, 1152) and bool(jnp.all(out >= 0))
  rgb = np.repeat(grey, 3, axis=-1)
  np.testing.assert_allclose(jax.jit(net.fn)(net.variables, rgb)["features"], out, rtol=1e-6)
  # The identity (cache key of reference statistics) covers the weights and the size.
  assert net.identity == features.alexnet_net(size=64).identity
  assert net.identity != features.alexnet_net(size=96).identity
  assert features.fingerprint(net.identity) == features.fingerprint(json.loads(
      json.dumps(net.identity)))


def test_default_metrics_per_task_and_data():
  import os  # pylint: disable=g-import-not-at-top
  from jaxgen.config import load_config  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  load = lambda spec, *o: load_config(os.path.join(root, "configs", spec), list(o))
  mnist = load("unet_mnist.py:smoke")
  assert evaluate.default_metrics(mnist, "generator", 10) == "class_accuracy,fd_digits,pr_digits"
  with_inception = load("unet_mnist.py:smoke", "eval.inception_weights=/w.pth")
  assert evaluate.default_metrics(with_inception, "generator", 10).endswith(",fid,is")
  assert evaluate.default_metrics(mnist, "generator", 1) == "fd_alexnet,pr_alexnet"
  # ImageNet: jaxgen's classifier cannot be trained in memory there; the standard metrics.
  imagenet = load("can_imagenet512.py")
  assert evaluate.default_metrics(imagenet, "generator", 1000) == "fid,is"
  with pytest.raises(ConfigError, match="eval.inception_weights is not set.*pt_inception"):
    evaluate.build_nets(imagenet, ["inception"], "/nonexistent")
  photos = load("dcae_photos.py:smoke")
  assert evaluate.default_metrics(photos, "reconstruction", 1) == "psnr,ssim,lpips,rfd_alexnet"
