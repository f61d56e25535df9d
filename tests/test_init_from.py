"""Fine-tuning from published weights (`model.init_from`, jaxgen/train/init_from.py).

A tiny random diffusers DiTTransformer2DModel (pixel space, 14x14 digits, patch 2, width 32)
is saved as a model directory, inside a DiTPipeline directory and as a converted directory;
configs/can_ablation.py:adaln with model.name=dit and the same dimensions starts from it.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from jaxgen import main as jaxgen_main
from jaxgen.config import load_config
from jaxgen.errors import ConfigError
from jaxgen.train import init_from, loop

CONFIG = "configs/can_ablation.py:adaln"
TABLE = "y_embedder/embedding_table/embedding"


def _overrides(init_dir, steps=4, hidden=32, devices=1):
  """One device keeps compiles small; the pipeline test places the weights on 8."""
  return [f"model.init_from={init_dir}", "model.name=dit", "model.depth=2",
          f"model.hidden_size={hidden}", "model.num_heads=2", "model.patch_size=2",
          "training.batch_size=16", f"training.steps={steps}", "training.log_every=5",
          "training.sample_every=0", f"checkpoint.every={steps}", "checkpoint.async_save=False",
          f"mesh.num_devices={devices}"]


def _save_tiny_dit(path, num_classes=10, seed=0):
  """A random DiTTransformer2DModel whose blocks share their embedders (as the hub's do)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
      num_layers=2, sample_size=14, patch_size=2, num_embeds_ada_norm=num_classes)
  emb = model.transformer_blocks[0].norm1.emb.state_dict()
  model.transformer_blocks[1].norm1.emb.load_state_dict(emb)
  model.save_pretrained(str(path))
  return model


def _converted_params(path):
  from jaxgen.convert import from_diffusers  # pylint: disable=g-import-not-at-top
  return jax.device_get(from_diffusers(str(path))[1]["params"])


def _assert_equal_trees(a, b, skip=()):
  flat_a = {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_leaves_with_path(a)}
  flat_b = {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_leaves_with_path(b)}
  assert sorted(flat_a) == sorted(flat_b)
  for name in flat_a:
    if name not in skip:
      np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), name)


def test_fine_tune_from_diffusers_dit(tmp_path, capsys):
  """CLI training from a diffusers model directory: step-0 params (and EMA) are the converted
  weights, the loss goes down, and a rerun resumes from the checkpoint instead."""
  src = tmp_path / "dit"
  _save_tiny_dit(src)
  want = _converted_params(src)

  setup = loop.build(load_config(CONFIG, _overrides(src)), str(tmp_path / "fresh"))
  _assert_equal_trees(jax.device_get(setup.state.params), want)
  _assert_equal_trees(jax.device_get(setup.state.ema_params), want)
  log = capsys.readouterr().out
  assert re.search(r"model.init_from: initialised (\d+) of \1 parameter tensors", log), log
  assert "time_freq_shift=1.0 (config: 0.0)" in log  # The weights' computation differs.

  workdir = str(tmp_path / "run")
  argv = ["--config=" + CONFIG, "--workdir=" + workdir]
  argv += ["--config." + o for o in _overrides(src, steps=20)]
  assert jaxgen_main.main(argv) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses

  capsys.readouterr()
  assert jaxgen_main.main(argv) == 0  # Finished: resumes from step 20, trains nothing.
  assert "not applied: the weights come from this workdir's checkpoint (step 20" in (
      capsys.readouterr().out)


def test_pipeline_and_converted_directories(tmp_path):
  """A DiTPipeline directory (its transformer/) and a `python -m jaxgen.convert` output load
  the same weights."""
  diffusers = pytest.importorskip("diffusers")
  from jaxgen.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
  transformer = _save_tiny_dit(tmp_path / "dit")
  want = _converted_params(tmp_path / "dit")
  vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,),
                                norm_num_groups=4, latent_channels=1, layers_per_block=1)
  diffusers.DiTPipeline(transformer=transformer, vae=vae,
                        scheduler=diffusers.DDIMScheduler()).save_pretrained(
                            str(tmp_path / "pipeline"))
  assert convert_main([f"--src={tmp_path / 'dit'}", f"--dst={tmp_path / 'converted'}"]) == 0
  for name in ("pipeline", "converted"):
    config = load_config(CONFIG, _overrides(tmp_path / name, devices=8))
    setup = loop.build(config, str(tmp_path / name) + "_run")
    _assert_equal_trees(jax.device_get(setup.state.params), want)
    leaf = setup.state.params["blocks_0"]["fc1"]["kernel"]
    assert leaf.sharding == setup.state_shardings.params["blocks_0"]["fc1"]["kernel"]


def test_class_count_resize(tmp_path, capsys):
  """4-class weights into a 10-class model: classes 0-3 and the null row are the weights',
  classes 4-9 keep the model's initialisation."""
  _save_tiny_dit(tmp_path / "dit4", num_classes=4)
  want = _converted_params(tmp_path / "dit4")
  setup = loop.build(load_config(CONFIG, _overrides(tmp_path / "dit4")), str(tmp_path / "a"))
  fresh = loop.build(load_config(CONFIG, _overrides("")), str(tmp_path / "b"))
  params, initial = jax.device_get(setup.state.params), jax.device_get(fresh.state.params)
  _assert_equal_trees(params, want, skip=(TABLE,))
  table, source = params["y_embedder"]["embedding_table"]["embedding"], want["y_embedder"][
      "embedding_table"]["embedding"]
  assert table.shape == (11, 32) and source.shape == (5, 32)
  np.testing.assert_array_equal(table[:4], source[:4])
  np.testing.assert_array_equal(table[10], source[4])  # The null-class row.
  np.testing.assert_array_equal(table[4:10], initial["y_embedder"]["embedding_table"][
      "embedding"][4:10])
  np.testing.assert_array_equal(
      jax.device_get(setup.state.ema_params)["y_embedder"]["embedding_table"]["embedding"], table)
  assert f"resized {TABLE} from 5 to 11 rows" in capsys.readouterr().out

  # Fewer classes than the weights: the first ones and the null row are kept.
  big, small = np.arange(26, dtype=np.float32).reshape(13, 2), np.zeros((4, 2), np.float32)
  np.testing.assert_array_equal(init_from.resize_label_table(big, small),
                                [big[0], big[1], big[2], big[12]])


def test_mismatch_errors(tmp_path, capsys):
  """An unfixable shape mismatch names the parameter, both shapes and the fix; a directory that
  holds no weights is refused."""
  _save_tiny_dit(tmp_path / "dit")
  with pytest.raises(ConfigError) as e:
    loop.build(load_config(CONFIG, _overrides(tmp_path / "dit", hidden=64)), str(tmp_path / "a"))
  message = str(e.value)
  assert "x_embedder/kernel: weights (2, 2, 1, 32) vs model (2, 2, 1, 64)" in message
  assert "model.hidden_size=32" in message

  argv = ["--config=" + CONFIG, f"--workdir={tmp_path / 'b'}"]
  argv += ["--config." + o for o in _overrides(tmp_path / "nothing")]
  assert jaxgen_main.main(argv) == 2
  assert "error: model.init_from=" in capsys.readouterr().err
