"""FastComposer: tokenizer, multi-subject data, subject fusion, localisation loss, delayed
subject conditioning, and the end-to-end smoke run through `python -m jaxgen.main`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import main as jaxgen_main
from jaxgen.config import load_config
from jaxgen.data import make_iterator, subjects
from jaxgen.diffusion.samplers import sampling_timesteps
from jaxgen.errors import DataError
from jaxgen.models import fastcomposer as fc
from jaxgen.tasks.fastcomposer import FastComposerTask, switch_timestep
from jaxgen.text.simple_tokenizer import WordTokenizer

CONFIG = "configs/fastcomposer_mnist.py"


def test_tokenizer_marks_subject_nouns():
  tok = WordTokenizer(max_length=16)
  ids, positions = tok.encode_with_subjects("a 3 <|image|> on the left and a 7 <|image|> on the "
                                            "right")
  assert tok.decode(ids) == "a 3 on the left and a 7 on the right"
  assert [tok.vocab[ids[p]] for p in positions] == ["3", "7"]
  assert ids[0] == tok.bos_id and ids[12] == tok.eos_id and (ids[13:] == tok.pad_id).all()
  np.testing.assert_array_equal(tok.encode("A 3, on the LEFT."), tok.encode("a 3 on the left"))
  assert tok.decode(tok.encode("a purple 3")) == "a <unk> 3"
  assert tok.eos_id != 2  # CLIP's text config reads eos id 2 as "legacy: use the largest id".
  with pytest.raises(DataError, match="at most 14"):
    tok.encode(" ".join(["a"] * 15))
  with pytest.raises(DataError, match="must follow a word"):
    tok.encode_with_subjects("<|image|> a 3")


def _data_config(**kw):
  config = load_config(CONFIG + ":smoke")
  with config.data.unlocked():
    config.data.update(kw)
  return config.data


def test_subject_compositions():
  data = _data_config(num_test=40)
  source = subjects.MnistSubjects(data)
  digits, labels = source.digits("test")
  ex = subjects.load_examples(data, "test", 40)
  again = subjects.load_examples(data, "test", 40)
  for k in ex:  # Deterministic by (seed, split, index).
    np.testing.assert_array_equal(ex[k], again[k])
  s = source.size
  assert ex["image"].shape == (40, s, 2 * s, 1) and ex["subject_masks"].shape == (40, 2, s, 2 * s)
  counts = ex["subject_valid"].sum(1)
  assert set(counts.tolist()) == {1.0, 2.0}
  tok = source.tokenizer
  for i in range(40):
    words = []
    for j in range(int(counts[i])):
      side, row, digit = (int(ex[k][i, j]) for k in ("subject_sides", "subject_rows",
                                                     "subject_digits"))
      half = ex["image"][i, :, side * s:(side + 1) * s]
      np.testing.assert_array_equal(half, digits[row])             # pasted subject
      np.testing.assert_array_equal(ex["subject_images"][i, j], digits[row])  # its reference
      assert labels[row] == digit
      assert tok.vocab[ex["input_ids"][i, ex["subject_positions"][i, j]]] == str(digit)
      mask = ex["subject_masks"][i, j]
      assert mask[:, (1 - side) * s:(2 - side) * s].sum() == 0 and mask.sum() > 10
      words.append(f"a {digit} on the {subjects.SIDES[side]}")
    assert source.caption({"input_ids": ex["input_ids"][i]}) == " and ".join(words)
    if counts[i] == 1:  # The other half is background and the second subject is empty.
      other = 1 - int(ex["subject_sides"][i, 0])
      assert (ex["image"][i, :, other * s:(other + 1) * s] == -1).all()
      assert ex["subject_valid"][i, 1] == 0 and (ex["subject_images"][i, 1] == -1).all()
  # The training stream draws fresh compositions per example through the data pipeline.
  batch = next(make_iterator(data, split="train", global_batch_size=8, seed=0,
                             process_index=0, process_count=1))
  assert batch["image"].shape == (8, s, 2 * s, 1) and batch["subject_images"].shape[:2] == (8, 2)


def test_fuse_subjects_matches_fastcomposer_formula():
  rng = np.random.default_rng(0)
  text = rng.standard_normal((2, 6, 8)).astype(np.float32)
  image = rng.standard_normal((2, 2, 5)).astype(np.float32)
  positions, valid = np.array([[2, 4], [3, 0]]), np.array([[1.0, 1.0], [1.0, 0.0]])
  fuse = fc.PostfuseMLP()
  params = jax.jit(fuse.init)(jax.random.PRNGKey(0), text[:, :2], image)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape), params)
  out = np.asarray(fc.fuse_subjects(lambda a, b: fuse.apply({"params": params}, a, b),
                                    jnp.asarray(text), jnp.asarray(image), jnp.asarray(positions),
                                    jnp.asarray(valid)))

  def ln(x, p):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return x * p["scale"] + p["bias"]

  def mlp(x, p):
    from scipy.special import erf  # pylint: disable=g-import-not-at-top
    h = ln(x, p["layernorm"]) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]

  p = jax.tree_util.tree_map(np.asarray, params)
  want = text.copy()
  for b, s in [(0, 0), (0, 1), (1, 0)]:
    t = text[b, positions[b, s]]
    h = mlp(np.concatenate([t, image[b, s]]), p["mlp1"]) + t
    h = mlp(h, p["mlp2"]) + h
    want[b, positions[b, s]] = ln(h, p["layer_norm"])
  np.testing.assert_allclose(out, want, atol=1e-5)  # Only the valid subjects' tokens change.


def test_localization_loss_closed_form():
  rng = np.random.default_rng(0)
  b, heads, h, w, length = 2, 3, 4, 8, 6
  logits = rng.standard_normal((b, heads, h, w, length))
  maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  masks = np.zeros((b, 2, h, w), np.float32)
  masks[:, 0, :, :4], masks[:, 1, 1:3, 5:7] = 1.0, 1.0
  positions, valid = np.array([[1, 3], [2, 5]]), np.array([[1.0, 1.0], [1.0, 0.0]])
  got = float(fc.localization_loss({"a": jnp.asarray(maps), "b": jnp.asarray(maps)},
                                   jnp.asarray(positions), jnp.asarray(valid), jnp.asarray(masks)))
  per_batch = []
  for i in range(b):
    terms = []
    for s in range(2):
      if valid[i, s]:
        p, m = maps[i, :, :, :, positions[i, s]], masks[i, s]
        terms.append((p * (1 - m)).sum((1, 2)) / ((1 - m).sum() + 1e-5)
                     - (p * m).sum((1, 2)) / (m.sum() + 1e-5))  # (heads,)
    per_batch.append(np.sum(terms, 0) / (valid[i].sum() + 1e-5))
  np.testing.assert_allclose(got, np.mean(per_batch), rtol=1e-5)
  # Attention entirely inside each mask scores -(1 / mask area) per subject.
  inside = np.zeros_like(maps)
  inside[:, :, :, :4, 1] = 1.0 / 16
  loss = fc.localization_loss({"a": jnp.asarray(inside)}, jnp.asarray([[1], [1]]),
                              jnp.ones((2, 1)), jnp.asarray(masks[:, :1]))
  np.testing.assert_allclose(float(loss), -1.0 / 16, rtol=1e-4)


def test_switch_timestep():
  ts = sampling_timesteps(1000, 30)
  assert switch_timestep(ts, 0.0) > ts[0]                    # subjects from the first step
  switch = switch_timestep(ts, 0.2)
  assert (ts >= switch).sum() == 6                           # text only for 20% of 30 steps
  assert (ts >= switch_timestep(ts, 1.0)).all()


def _random_params(task, seed=0):
  """Random weights of the task's model (no zero-initialised layers, so the context reaches the
  output): kernels at 0.5 / sqrt(fan_in), norm scales near 1, biases small. Drawn with numpy
  from the abstract shapes, because compiling the U-Net's init is slow on CPU."""
  shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0), None)[0]
  rng = np.random.default_rng(seed)
  def draw(path, p):
    name = jax.tree_util.keystr(path[-1:])
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(p.shape), jnp.float32)
    scale = 0.5 / np.sqrt(np.prod(p.shape[:-1])) if len(p.shape) >= 2 else 0.02
    return jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_delayed_subject_conditioning_and_attention_maps():
  config = load_config(CONFIG + ":smoke")
  task = FastComposerTask(config, (16, 32, 1), 10)
  params = _random_params(task)
  ex = subjects.load_examples(config.data, "test", 2)
  cond = {k: jnp.asarray(ex[k]) for k in ("input_ids", "subject_images", "subject_positions",
                                          "subject_valid")}
  other = dict(cond, subject_images=-cond["subject_images"])
  rng = jax.random.PRNGKey(0)
  gen = jax.jit(task.sample_batch, static_argnums=4)
  text_only = np.asarray(gen(params, {}, rng, cond, 1.0))
  np.testing.assert_array_equal(text_only, np.asarray(gen(params, {}, rng, other, 1.0)))
  with_subjects = np.asarray(gen(params, {}, rng, cond, 0.0))
  # (Random weights push most pixels to the clip at +-1; any change comes from the subjects.)
  assert np.abs(with_subjects - np.asarray(gen(params, {}, rng, other, 0.0))).max() > 1e-5
  assert with_subjects.shape == (2, 16, 32, 1) and np.abs(with_subjects).max() <= 1.0

  # Inference-time cross-attention maps: per layer probabilities over the caption tokens.
  x = jnp.asarray(ex["image"])

  @jax.jit
  def maps_of(params):
    variables = {"params": params}
    _, augmented = task.model.apply(variables, *cond.values(), method="encode")
    return fc.cross_attention_maps(task.model, variables, x, jnp.array([500, 500]), augmented)[1]
  maps = maps_of(params)
  assert list(maps) == ["unet/mid_attn/transformer_blocks_0"]
  assert maps["unet/mid_attn/transformer_blocks_0"].shape == (2, 2, 4, 8, 16)  # patch 2, 1 down
  for m in maps.values():
    np.testing.assert_allclose(np.asarray(m.sum(-1)), 1.0, atol=1e-5)
  readout = np.asarray(jax.jit(task.attention_readout)(params, {}, rng, x, cond))
  assert readout.shape == (2, 2, 16, 32) and 0 <= readout.min() and readout.max() <= 1


def test_frozen_text_encoder_gets_no_update():
  import optax  # pylint: disable=g-import-not-at-top
  config = load_config(CONFIG + ":smoke")
  task = FastComposerTask(config, (16, 32, 1), 10)
  params = _random_params(task)
  tx, _ = task.make_optimizer(10)

  @jax.jit
  def update(params):
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)
  new = update(params)
  changed = lambda a, b: bool(jax.tree_util.tree_reduce(
      lambda acc, x: acc or x, jax.tree_util.tree_map(lambda u, v: bool((u != v).any()), a, b)))
  assert not changed(new["text_encoder"], params["text_encoder"])
  assert changed(new["image_encoder"], params["image_encoder"])
  assert changed(new["unet"], params["unet"])
  assert changed(new["postfuse_module"], params["postfuse_module"])


def test_batched_generation_pads_and_shards_over_the_mesh():
  """generate_examples / attention_maps run in padded chunks sharded over all 8 devices."""
  import types  # pylint: disable=g-import-not-at-top
  from jaxgen import sharding  # pylint: disable=g-import-not-at-top
  config = load_config(CONFIG + ":smoke")
  with config.unlocked():
    config.sample.batch_size = 12  # -> chunks of 8 (a multiple of the 8 batch shards)
  task = FastComposerTask(config, (16, 32, 1), 10)
  mesh = sharding.make_mesh(config.mesh)
  state = types.SimpleNamespace(ema_params={"w": jnp.float32(2.0)}, params=None, model_state={})
  setup = types.SimpleNamespace(mesh=mesh, state=state)
  seen = []

  def fn(params, model_state, rng, arrays):
    seen.append(arrays["x"].shape)  # Traced once: every chunk has the same padded shape.
    return arrays["x"] * params["w"] + jax.random.uniform(rng, ()) * 0
  x = np.arange(19, dtype=np.float32)
  out = task._run_batched(setup, fn, None, True, {"x": x}, seed=0)  # pylint: disable=protected-access
  np.testing.assert_array_equal(out, 2 * x)
  assert seen == [(8,)]


def test_smoke_train_sample_eval(tmp_path):
  workdir = str(tmp_path / "fc")
  # One device: this test is about the pipeline end to end, and compiling for 8 virtual devices
  # (and checkpointing their shards) adds ~50% to the slowest test of the file.
  spec = [f"--config={CONFIG}:smoke", "--config.mesh.num_devices=1"]
  assert jaxgen_main.main(spec + [f"--workdir={workdir}"]) == 0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 4 and {"mse", "loc_loss"} <= set(rows[-1])
  assert jaxgen_main.main(spec + [f"--workdir={workdir}", "--mode=sample"]) == 0
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (4, 16, 32, 1) and samples["attention"].shape == (4, 2, 16, 32)
  assert all(os.path.exists(os.path.join(workdir, "samples", f))
             for f in ("grid.png", "attention.png", "captions.txt"))
  assert jaxgen_main.main(spec + [f"--workdir={workdir}", "--mode=eval"]) == 0
  with open(os.path.join(workdir, "eval", "4.json")) as f:
    result = json.load(f)
  for key in ("prompt_consistency", "attention_in_place", "prompt_consistency_two_subjects"):
    assert 0.0 <= result[key] <= 1.0
  for key in ("identity", "identity_same_class_baseline"):
    assert -1.0 <= result[key] <= 1.0
  assert result["num_prompts"] == 4 and result["subject_start"] == 0.2
