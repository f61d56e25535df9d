"""SD-VAE (AutoencoderKL): parity with diffusers on random tiny weights, posterior, conversion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxgen.convert import from_diffusers, load_autoencoder  # noqa: E402
from jaxgen.errors import ConfigError, WeightsError  # noqa: E402
from jaxgen.models.vae_kl import kl_divergence  # noqa: E402
from jaxgen.registry import MODELS  # noqa: E402

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
            layers_per_block=1, scaling_factor=0.13025)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  """A diffusers AutoencoderKL with every tensor (GroupNorm scales, biases too) randomised."""
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(**TINY)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  d = tmp_path_factory.mktemp("vae_kl")
  ref.eval().save_pretrained(str(d), safe_serialization=True)
  return str(d), ref


def test_parity_with_diffusers(vae_dir):
  """Posterior mean / logvar, decode and the forward pass on a non-square 24x40 batch: 1e-4."""
  path, ref = vae_dir
  model, variables = from_diffusers(path)
  assert model.scaling_factor == 0.13025 and model.spatial_compression_ratio == 2
  x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
  z = np.random.RandomState(1).randn(2, 4, 12, 20).astype(np.float32)
  with torch.no_grad():
    posterior = ref.encode(torch.tensor(x)).latent_dist
    decoded = ref.decode(torch.tensor(z)).sample
    forward = ref(torch.tensor(x)).sample  # Decodes the posterior mode (mean).
    kl = posterior.kl()
  x_nhwc = x.transpose(0, 2, 3, 1)
  mean, logvar = model.apply(variables, x_nhwc, method="encode_moments")
  assert mean.shape == (2, 12, 20, 4)
  assert _rel(mean, _nhwc(posterior.mean)) < 1e-4
  assert _rel(logvar, _nhwc(posterior.logvar)) < 1e-4
  assert _rel(model.apply(variables, x_nhwc, method="encode"), _nhwc(posterior.mean)) < 1e-4
  assert _rel(model.apply(variables, z.transpose(0, 2, 3, 1), method="decode"),
              _nhwc(decoded)) < 1e-4
  assert _rel(model.apply(variables, x_nhwc), _nhwc(forward)) < 1e-4
  assert _rel(kl_divergence(mean, logvar), kl.numpy()) < 1e-4

  # A posterior sample is mean + std * N(0, 1) with the given key.
  key = jax.random.PRNGKey(3)
  sample = model.apply(variables, x_nhwc, rng=key, method="encode")
  noise = jax.random.normal(key, mean.shape)
  np.testing.assert_allclose(sample, mean + jnp.exp(0.5 * logvar) * noise, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(sample - mean))) > 1e-3


def test_load_autoencoder_and_legacy_attention_names(vae_dir, tmp_path):
  """The latent-diffusion loader reads the directory; pre-0.14 attention names load the same."""
  path, _ = vae_dir
  model, variables = load_autoencoder(path)
  assert type(model).__name__ == "AutoencoderKL"
  state = load_file(f"{path}/diffusion_pytorch_model.safetensors")
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn",
            "group_norm": "group_norm"}
  renamed = {}
  for k, v in state.items():
    for new, old in legacy.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    renamed[k] = v
  assert any(".query." in k for k in renamed)
  save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with open(f"{path}/config.json") as f:
    config = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  _, again = from_diffusers(str(tmp_path))
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)

  # Missing and unknown tensors are named.
  del renamed["decoder.up_blocks.1.resnets.1.conv1.weight"]
  renamed["encoder.mid_block.attentions.0.rope.weight"] = np.zeros(3, np.float32)
  save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(WeightsError) as err:
    from_diffusers(str(tmp_path))
  assert "decoder/up_blocks_1_resnets_1/conv1/kernel" in str(err.value)
  assert "encoder.mid_block.attentions.0.rope.weight" in str(err.value)


def test_registry_config_and_options():
  model = MODELS.get("vae_kl")(**TINY, _class_name="AutoencoderKL", force_upcast=True,
                               mid_block_add_attention=False, use_quant_conv=False)
  x = jnp.zeros((1, 8, 8, 3))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  assert "quant_conv" not in params and "post_quant_conv" in params
  assert "attentions_0" not in params["encoder"]["mid_block"]
  assert jax.eval_shape(model.apply, {"params": params}, x).shape == (1, 8, 8, 3)
  # The SD-1.x VAE (KL-f8): 83.65M parameters, 4x(H/8)x(W/8) latents.
  sd = MODELS.get("vae_kl")(
      block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
  shapes = jax.eval_shape(sd.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(np.prod(v.shape) for v in jax.tree.leaves(shapes)) == 83_653_863
  assert jax.eval_shape(lambda v: sd.apply(v, jnp.zeros((1, 64, 64, 3)), method="encode"),
                        shapes).shape == (1, 8, 8, 4)
  with pytest.raises(ConfigError, match="divisible"):
    MODELS.get("vae_kl")(**{**TINY, "norm_num_groups": 24}).init(jax.random.PRNGKey(0), x)
