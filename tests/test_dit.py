"""DiT / CAN-DiT: presets, counts, init properties, and parity with diffusers' DiTTransformer2DModel."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgen.errors import ConfigError, WeightsError
from jaxgen.models.dit import dit, dit_preset, can_dit, get_2d_sincos_pos_embed
from jaxgen.models.flops import backbone_costs
from jaxgen.registry import MODELS

KEY = jax.random.PRNGKey(0)
TINY = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, num_classes=10)


def _inputs(b=3, size=8, c=4):
  x = jax.random.normal(jax.random.PRNGKey(1), (b, size, size, c))
  return x, jnp.array([1.0, 500.0, 999.0])[:b], jnp.array([0, 7, 10])[:b]


def _randomize(params, pred, seed=3, scale=0.1):
  """Replaces the leaves whose path matches `pred` (e.g. the zero-initialised ones) by noise."""
  flat = flatten_dict(params, sep="/")
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(flat)))
  return unflatten_dict({k: scale * jax.random.normal(next(keys), v.shape) if pred(k) else v
                         for k, v in flat.items()}, sep="/")


def test_presets_and_registry():
  assert dit_preset("DiT-XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
  assert dit_preset("S/8")["patch_size"] == 8 and dit_preset("dit_b_4")["hidden_size"] == 768
  with pytest.raises(ConfigError, match="DiT-XL/2"):
    dit_preset("DiT-XXL/2")
  with pytest.raises(ConfigError):
    dit_preset("DiT-B/3")
  model = MODELS.get("dit")(preset="DiT-L/4", num_classes=10)
  assert (model.depth, model.hidden_size, model.patch_size, model.num_classes) == (24, 1024, 4, 10)
  assert MODELS.get("can_dit")(**TINY).ca_ffn


def test_dit_xl2_params_and_flops():
  """DiT paper: DiT-XL/2 675M params, 118.6 GFLOPs (= G multiply-adds) at 256, 524.6 at 512."""
  costs = backbone_costs(dit("DiT-XL/2"), (32, 32, 4))
  # facebookresearch/DiT counts its fixed pos_embed nn.Parameter (256 x 1152) too.
  assert costs["params"] + 256 * 1152 == 675_129_632
  assert abs(costs["gmacs"] - 118.6) < 0.1 and abs(costs["gflops"] - 237.2) < 0.2
  assert abs(backbone_costs(dit("DiT-XL/2"), (64, 64, 4))["gmacs"] - 524.6) < 0.2
  small = backbone_costs(dit("DiT-S/2"), (32, 32, 4))
  assert abs(small["params"] / 1e6 - 33) < 0.5 and abs(small["gmacs"] - 6.06) < 0.05


def test_shapes_every_patch_size():
  x, t, y = _inputs()
  for patch in (1, 2, 4, 8):
    for learn_sigma, channels in ((True, 8), (False, 4)):
      model = dit(**{**TINY, "depth": 1, "patch_size": patch, "learn_sigma": learn_sigma})
      variables = jax.eval_shape(model.init, KEY, x, t, y)
      out = jax.eval_shape(model.apply, variables, x, t, y)
      assert out.shape == (3, 8, 8, channels) and out.dtype == jnp.float32, (patch, learn_sigma)


def test_zero_output_at_init_and_jit():
  x, t, y = _inputs()
  model = dit(**TINY)
  params = jax.jit(model.init)(KEY, x, t, y)["params"]
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, t, y))
  assert np.all(np.asarray(apply(params, x)) == 0)  # adaLN-Zero: the final linear starts at 0
  assert np.abs(apply(_randomize(params, lambda k: "final_layer" in k), x)).max() > 0
  with pytest.raises(ConfigError, match="divisible"):
    apply(params, x[:, :7, :7])


def test_pos_embed_matches_dit_layout():
  emb = get_2d_sincos_pos_embed(8, 2, 3)
  assert emb.shape == (6, 8)
  # Token (row 1, col 2): first half encodes the column (2), second half the row (1).
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  want = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
  np.testing.assert_allclose(emb[5], want, rtol=1e-6)
  with pytest.raises(ConfigError, match="divisible by 4"):
    get_2d_sincos_pos_embed(6, 2, 2)


def test_can_dit_all_off_is_dit_and_zero_init_generators_are_dit():
  x, t, y = _inputs()
  base = dit(**TINY)
  params = _randomize(base.init(KEY, x, t, y)["params"], lambda k: "adaLN" in k or "final" in k)
  run = lambda model, p: jax.jit(lambda p: model.apply({"params": p}, x, t, y))(p)
  want = run(base, params)

  off = can_dit(**TINY, ca_patch_embed=False, ca_attn_out=False, ca_ffn=False)
  off_params = jax.eval_shape(off.init, KEY, x, t, y)["params"]
  assert jax.tree_util.tree_structure(off_params) == jax.tree_util.tree_structure(params)
  np.testing.assert_array_equal(run(off, params), want)

  on = can_dit(**TINY)  # every CA layer on, adaLN on
  flat_on = flatten_dict(jax.jit(on.init)(KEY, x, t, y)["params"], sep="/")
  flat_base = flatten_dict(params, sep="/")
  extra = set(flat_on) - set(flat_base)
  assert extra and all("weight_generator" in k or "/basis_" in k for k in extra)
  generated = {k.split("/")[-4] for k in extra if k.endswith("weight_generator/proj/kernel")}
  assert generated >= {"x_embedder", "to_out", "fc1", "fc2"}
  merged = unflatten_dict({**flat_on, **flat_base}, sep="/")
  np.testing.assert_allclose(run(on, merged), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [None, 4])
def test_can_dit_without_adaln_conditions_through_ca_layers(rank):
  x, t, y = _inputs()
  model = can_dit(**TINY, adaln=False, ca_rank=rank)
  params = jax.jit(model.init)(KEY, x, t, y)["params"]
  assert not any("adaLN" in k for k in flatten_dict(params, sep="/"))
  params = _randomize(params, lambda k: "weight_generator" in k or "final_layer/linear" in k)
  f = jax.jit(lambda y: model.apply({"params": params}, x, t, y))
  out, out_other_label = f(y), f(jnp.array([3, 3, 3]))
  assert out.shape == (3, 8, 8, 8)
  assert np.abs(out - out_other_label).max() > 1e-4  # the label reaches the output


# ---------------------------------------------------------------------------------------------
# Parity with diffusers (random weights, tiny sizes).


def _tiny_diffusers_dit(tmp_path, same_embedders=True):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
  with torch.no_grad():
    for p in model.parameters():  # diffusers' init leaves nothing at zero, but make it random
      p.copy_(torch.randn_like(p) * 0.2)
    if same_embedders:  # as in the hub checkpoints: every block holds the same embedders
      emb = model.transformer_blocks[0].norm1.emb.state_dict()
      for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb)
  model.save_pretrained(str(tmp_path))
  return model


def _max_rel_error_vs_diffusers(ref_model, model, variables):
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
  t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 7, 10])  # 10 = null label
  with torch.no_grad():
    ref = ref_model(x, timestep=t, class_labels=y).sample.numpy()
  out = model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                    jnp.asarray(t.numpy()), jnp.asarray(y.numpy()))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  return np.abs(out - ref).max() / np.abs(ref).max()


def test_parity_with_diffusers(tmp_path):
  from jaxgen.convert import from_diffusers  # pylint: disable=g-import-not-at-top
  ref_model = _tiny_diffusers_dit(tmp_path)
  model, variables = from_diffusers(str(tmp_path))
  assert (model.depth, model.hidden_size, model.norm_eps, model.time_freq_shift) == (
      2, 64, 1e-5, 1.0)
  assert not model.per_block_embedders and "t_embedder" in variables["params"]
  rel = _max_rel_error_vs_diffusers(ref_model, model, variables)
  assert rel < 1e-4, rel

  # The hub checkpoints' legacy class name converts the same way.
  cfg_path = os.path.join(tmp_path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["_class_name"] = "Transformer2DModel"
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  _, legacy = from_diffusers(str(tmp_path))
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, legacy, variables))


def test_conversion_errors(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from jaxgen.convert import from_diffusers  # pylint: disable=g-import-not-at-top
  _tiny_diffusers_dit(tmp_path)
  path = os.path.join(tmp_path, "diffusion_pytorch_model.safetensors")
  state = load_file(path)
  del state["transformer_blocks.1.ff.net.2.weight"]
  save_file(state, path)
  with pytest.raises(WeightsError, match="blocks_1/fc2/kernel"):
    from_diffusers(str(tmp_path))


def test_parity_with_diffusers_per_block_embedders(tmp_path):
  """A DiT whose per-block embedders differ (fine-tuned in diffusers) converts to
  per_block_embedders=True: block i uses its own copy, the final layer block 0's."""
  import torch  # pylint: disable=g-import-not-at-top
  from jaxgen.convert import from_diffusers  # pylint: disable=g-import-not-at-top
  ref_model = _tiny_diffusers_dit(tmp_path)
  with torch.no_grad():  # Perturb block 1's copies only, as a little fine-tuning would.
    for p in ref_model.transformer_blocks[1].norm1.emb.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  ref_model.save_pretrained(str(tmp_path))
  model, variables = from_diffusers(str(tmp_path))
  params = variables["params"]
  assert model.per_block_embedders and "t_embedder" not in params
  assert {"t_embedder_0", "t_embedder_1", "y_embedder_0", "y_embedder_1"} <= set(params)
  emb1 = ref_model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight
  np.testing.assert_array_equal(params["y_embedder_1"]["embedding_table"]["embedding"],
                                emb1.detach().numpy())
  rel = _max_rel_error_vs_diffusers(ref_model, model, variables)
  assert rel < 1e-4, rel
  # Using block 0's embedder everywhere (the shared layout) would be visibly wrong.
  shared = {k: v for k, v in params.items() if not k.startswith(("t_embedder", "y_embedder"))}
  shared.update(t_embedder=params["t_embedder_0"], y_embedder=params["y_embedder_0"])
  rel_shared = _max_rel_error_vs_diffusers(
      ref_model, model.clone(per_block_embedders=False), {"params": shared})
  assert rel_shared > 1e-2, rel_shared
  # Random init of the option: one embedder per block, distinct tables.
  x, t, y = _inputs(size=8)
  init = dit(depth=3, hidden_size=32, num_heads=2, patch_size=2, num_classes=10,
             per_block_embedders=True).init(jax.random.PRNGKey(0), x, t, y)["params"]
  assert sorted(k for k in init if k.startswith(("t_embedder", "y_embedder"))) == [
      "t_embedder_0", "t_embedder_1", "t_embedder_2", "y_embedder_0", "y_embedder_1",
      "y_embedder_2"]
