"""`python -m jaxgen.main --mode=eval` after 2 training steps, for every config's `smoke` preset;
the reference cache, the Inception path (random weights in pytorch-fid's layout) and errors.

The digit classifier and reference statistics are cached in one directory shared by all the
runs (eval.cache_dir), as a user would share them between runs on the same data.
"""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from jaxgen import main as main_lib
from jaxgen.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("common", "__")))
# Configs whose smoke preset already trains and evaluates in their own test (not run twice).
EVALUATED_ELSEWHERE = {
    "can_digits": "test_can_digits.py::test_smoke_stages_resume_skip_sample_eval",
    "can_imagenet512": "test_latent_diffusion.py::test_smoke_train_sample_eval",
    "dit_xl2_256": "test_latent_diffusion.py::test_smoke_train_sample_eval",
    "fastcomposer_mnist": "test_fastcomposer.py::test_smoke_train_sample_eval",
    "dcae_f32c32": "test_autoencoder.py::test_smoke_train_resume_sample_eval_reconstruct",
    # Fine-tuning configs need a published pipeline directory (model.init_from); their tests
    # build a tiny one, train and sample (their --mode=eval is not implemented yet).
    "sd_finetune": "test_finetune_published.py::test_sd_finetune_train_and_sample",
    "fastcomposer_release":
        "test_finetune_published.py::test_fastcomposer_release_finetune_and_sample",
}
FAST = ["training.steps=2", "checkpoint.every=2", "training.log_every=1", "sample.num_steps=2",
        "sample.batch_size=8", "eval.num_samples=8", "eval.reference_samples=64"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("eval_cache"))


def args_for(name, workdir, cache_dir, *extra):
  return ([f"--config={os.path.join(ROOT, 'configs', name + '.py')}:smoke",
           f"--workdir={workdir}", f"--config.eval.cache_dir={cache_dir}"] +
          [f"--config.{o}" for o in FAST + list(extra)])


def smoke_config(name):
  return load_config(os.path.join(ROOT, "configs", name + ".py") + ":smoke", FAST)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
  """name -> a fresh copy of a workdir trained 2 steps with that config's smoke preset.
  Presets whose configs are identical (the ImageNet latent configs share one smoke model)
  train once and get copies of that workdir (the checkpoint their own training would write)."""
  by_config = {}

  def get(name):
    key = json.dumps(smoke_config(name).to_dict(), sort_keys=True, default=str)
    if key not in by_config:
      workdir = str(tmp_path_factory.mktemp(name))
      # Trained on one device (a cheaper compile); evaluated on all 8, which also restores the
      # checkpoint onto another mesh.
      assert main_lib.main(args_for(name, workdir, cache, "mesh.num_devices=1")) == 0
      by_config[key] = workdir
    copy = str(tmp_path_factory.mktemp(name + "_eval"))
    shutil.copytree(by_config[key], copy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("eval", "tensorboard"))
    return copy
  return get


def read_eval(workdir, step=2):
  with open(os.path.join(workdir, "eval", f"{step}.json")) as f:
    return json.load(f)


def tensorboard_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  acc.Reload()
  tags = acc.Tags()
  return set(tags["scalars"]) | set(tags["tensors"])  # TF2 summaries are stored as tensors.


def test_every_config_has_a_smoke_preset():
  assert {"unet_mnist", "dcae_photos", "dit_xl2_256"} <= set(CONFIGS)
  for name, where in EVALUATED_ELSEWHERE.items():
    test_file, test_name = where.split("::")
    with open(os.path.join(ROOT, "tests", test_file)) as f:
      source = f.read()
    assert f"def {test_name}(" in source and name in source, where
    assert "eval" in test_name or "sample" in test_name, where


@pytest.mark.parametrize("name", [c for c in CONFIGS if c not in EVALUATED_ELSEWHERE])
def test_eval_after_two_steps(name, trained, cache, capsys):
  workdir = trained(name)
  capsys.readouterr()
  assert main_lib.main(args_for(name, workdir, cache) + ["--mode=eval"]) == 0
  err = capsys.readouterr().err
  result = read_eval(workdir)
  assert result["step"] == 2
  numbers = {k: v for k, v in result.items() if isinstance(v, float)}
  assert numbers and all(np.isfinite(v) for v in numbers.values()), result
  assert {f"eval/{k}" for k in numbers} <= tensorboard_tags(workdir)
  task = smoke_config(name).task
  if task in ("diffusion", "latent_diffusion"):
    assert result["num_samples"] == 8
    assert "sampling 8 images (" in err and "8/8 (100%)" in err  # The progress lines.
    for key in ("class_accuracy", "precision_digits", "recall_digits"):
      assert 0.0 <= result[key] <= 1.0
    assert result["fd_digits"] > 0
    assert "NOT comparable to Inception FID" in result["feature_nets"]["digits"]
    assert result["references"]["digits"]["count"] == 64
  elif task == "autoencoder":
    assert result["num_images"] == 8 and "8/8 (100%)" in err
    for key in ("psnr", "ssim", "lpips", "rfd_alexnet", "bicubic_psnr"):
      assert key in numbers
    assert result["rfd_alexnet"] > 0


@pytest.fixture(scope="module")
def mnist_workdir(trained):
  return trained("unet_mnist")


def test_reference_cached_and_single_device_agrees(mnist_workdir, cache, capsys):
  """The second evaluation reuses the cached reference; 1 device gives the 8-device numbers."""
  args = args_for("unet_mnist", mnist_workdir, cache, "eval.metrics=class_accuracy,fd_digits,"
                  "pr_digits,kid_digits,is_digits", "eval.kid_subset_size=4", "eval.is_splits=2")
  assert main_lib.main(args + ["--mode=eval"]) == 0
  first = read_eval(mnist_workdir)
  refs = glob.glob(os.path.join(cache, "reference_digits_*.npz"))
  mtimes = {p: os.path.getmtime(p) for p in refs}
  capsys.readouterr()
  assert main_lib.main(args + ["--mode=eval", "--config.mesh.num_devices=1"]) == 0
  assert "reference features" not in capsys.readouterr().err  # Not recomputed.
  assert {p: os.path.getmtime(p) for p in refs} == mtimes
  single = read_eval(mnist_workdir)
  for key in ("fd_digits", "kid_digits", "is_digits"):
    assert single[key] == pytest.approx(first[key], rel=1e-3, abs=1e-4), key
  for key in ("class_accuracy", "precision_digits", "recall_digits"):
    assert single[key] == first[key], key
  assert first["is_digits"] >= 1.0 and first["kid_digits_std"] >= 0.0


def random_inception_file(path):
  """Random weights in pytorch-fid's state-dict layout (OIHW convs, BatchNorm running stats)."""
  from jaxgen.convert.common import flatten  # pylint: disable=g-import-not-at-top
  from jaxgen.metrics import inception  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  state = {}
  abstract = inception.abstract_variables()
  for key, leaf in flatten(abstract["params"]).items():
    module, name = key.rsplit("/", 1)
    torch_module = module.replace("/", ".")
    if name == "kernel" and len(leaf.shape) == 4:
      h, w, i, o = leaf.shape
      state[f"{torch_module}.weight"] = (rng.standard_normal((o, i, h, w)) *
                                         np.sqrt(2.0 / (h * w * i))).astype(np.float32)
    elif name == "kernel":
      state[f"{torch_module}.weight"] = (rng.standard_normal(leaf.shape[::-1]) * 0.02).astype(
          np.float32)
    elif module == "fc":
      state["fc.bias"] = np.zeros(leaf.shape, np.float32)
    else:
      torch_name = {"scale": "weight", "bias": "bias"}[name]
      state[f"{torch_module}.{torch_name}"] = np.full(leaf.shape, 1.0 if name == "scale" else 0.0,
                                                      np.float32)
  for key, leaf in flatten(abstract["batch_stats"]).items():
    module, name = key.rsplit("/", 1)
    torch_name = {"mean": "running_mean", "var": "running_var"}[name]
    # Unit-RMS activations need the input's second moment; 2.0 keeps them O(1) here.
    state[f"{module.replace('/', '.')}.{torch_name}"] = np.full(
        leaf.shape, 0.0 if name == "mean" else 2.0, np.float32)
  inception.save_safetensors(state, path)


def test_inception_metrics_and_missing_weights(mnist_workdir, cache, tmp_path, capsys):
  """fid / is / kid / precision-recall through the Inception network (random weights in
  pytorch-fid's layout); without weights, an error naming the file to download."""
  missing = args_for("unet_mnist", mnist_workdir, cache, "eval.metrics=fid")
  assert main_lib.main(missing + ["--mode=eval"]) == 2
  err = capsys.readouterr().err
  assert "pt_inception-2015-12-05" in err and "eval.inception_weights" in err
  weights = str(tmp_path / "inception.safetensors")
  random_inception_file(weights)
  args = args_for("unet_mnist", mnist_workdir, cache, f"eval.inception_weights={weights}",
                  "eval.metrics=fid,is,kid,pr", "eval.reference_samples=16",
                  "eval.kid_subset_size=8", "eval.is_splits=2")
  assert main_lib.main(args + ["--mode=eval"]) == 0
  result = read_eval(mnist_workdir)
  assert result["fid"] > 0 and result["is"] >= 1.0 and np.isfinite(result["kid"])
  assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
  assert result["references"]["inception"]["count"] == 16
  assert "comparable to published" in result["feature_nets"]["inception"]
  # A pytorch-fid style reference file (mu, sigma only) serves FID, not precision/recall.
  ref = np.load(result["references"]["inception"]["source"])
  stats = str(tmp_path / "stats.npz")
  np.savez(stats, mu=ref["mu"], sigma=ref["sigma"])
  assert main_lib.main(args + ["--mode=eval", f"--config.eval.reference_stats={stats}",
                               "--config.eval.metrics=fid"]) == 0
  assert read_eval(mnist_workdir)["fid"] == pytest.approx(result["fid"], rel=1e-6)
  capsys.readouterr()
  assert main_lib.main(args + ["--mode=eval", f"--config.eval.reference_stats={stats}",
                               "--config.eval.metrics=pr"]) == 2
  assert "holds only mu and sigma" in capsys.readouterr().err


def test_unknown_metric_is_a_config_error(mnist_workdir, cache, capsys):
  args = args_for("unet_mnist", mnist_workdir, cache, "eval.metrics=fd_vgg")
  assert main_lib.main(args + ["--mode=eval"]) == 2
  assert "unknown metric 'fd_vgg'" in capsys.readouterr().err
