"""The PyTorch twin of jaxgen's U-Net (benchmarks/torch_unet.py) computes the same function.

Random (non-zero everywhere, so the zero-initialised output convs do not hide anything) jaxgen
weights are copied into the twin; outputs must agree to 1e-5 of their scale in float32.
"""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.torch_unet import TorchUNet, load_jax_params
from jaxgen.errors import WeightsError
from jaxgen.models.unet import UNet

KWARGS = dict(num_classes=10, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
              attention_levels=(1,), num_heads=2, num_groups=4, dropout=0.1)


def _random_params(shapes, seed=0):
  """Every leaf drawn at a fan-in scale (GroupNorm scales around 1); numpy keeps it fast."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, leaf in leaves:
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = jax.tree_util.keystr(path[-1:])
    if leaf.ndim >= 2:
      out.append(noise / np.sqrt(np.prod(leaf.shape[:-1])))
    elif "scale" in name:
      out.append(1.0 + 0.2 * noise)
    else:
      out.append(0.2 * noise)
  return jax.tree_util.tree_unflatten(treedef, out)


def _pair(patch_size):
  model = UNet(patch_size=patch_size, **KWARGS)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((4,)),
                          jnp.zeros((4,), jnp.int32))
  params = _random_params(shapes["params"])
  twin = TorchUNet(in_channels=3, patch_size=patch_size, **KWARGS).eval()
  load_jax_params(twin, params)
  return model, params, twin, x


@pytest.mark.parametrize("patch_size", [1, 2])
def test_outputs_match(patch_size):
  model, params, twin, x = _pair(patch_size)
  t = jnp.array([0.0, 17.0, 499.5, 999.0])
  y = jnp.array([0, 3, 9, 10], jnp.int32)  # 10 = num_classes: the null label.
  want = np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, t, y, train=False))(params))
  with torch.no_grad():
    got = twin(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2), torch.tensor(np.asarray(t)),
               torch.tensor(np.asarray(y)).long())
  got = got.permute(0, 2, 3, 1).numpy()
  assert got.shape == want.shape == (4, 16, 16, 3)
  scale = np.abs(want).max()
  assert scale > 0.1  # The random weights reach the output.
  assert np.abs(got - want).max() <= 1e-5 * scale, np.abs(got - want).max() / scale


def test_parameter_count_and_group_norm_epsilon_match():
  _, params, twin, _ = _pair(2)
  n_jax = sum(np.size(p) for p in jax.tree.leaves(params))
  assert n_jax == sum(p.numel() for p in twin.parameters())
  # An epsilon off by 10x moves the outputs by only ~1e-5 here, so check it directly.
  norms = [m for m in twin.modules() if isinstance(m, torch.nn.GroupNorm)]
  assert norms and all(m.eps == flax.linen.GroupNorm.epsilon for m in norms)


def test_load_rejects_other_widths():
  _, params, _, _ = _pair(1)
  other = TorchUNet(in_channels=3, **dict(KWARGS, base_channels=8))
  with pytest.raises(WeightsError, match="shape mismatches"):
    load_jax_params(other, params)
  with pytest.raises(WeightsError, match="without a jax tensor"):
    load_jax_params(TorchUNet(in_channels=3, **dict(KWARGS, num_res_blocks=2)), params)
