"""DC-AE: parity with diffusers' AutoencoderDC, weight conversion, parameter counts."""

import fractions
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxgen.convert import from_diffusers  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxgen.convert import dcae as convert_dcae  # noqa: E402
from jaxgen.errors import ConfigError, WeightsError  # noqa: E402
from jaxgen.models.dcae import VARIANTS, dcae, dcae_config  # noqa: E402
from jaxgen.nn.efficientvit import (FusedMBConv, MBConv,  # noqa: E402
                                    relu_linear_attention)
from jaxgen.registry import MODELS  # noqa: E402

TOL = 1e-4  # max |jax - torch| / max |torch|

# Encoder / decoder parameter counts (BatchNorm statistics excluded), REFERENCE.md section 1.
PARAM_COUNTS = {
    "f32c32": (123_172_384, 200_184_076),
    "f64c128": (264_550_528, 412_345_612),
    "f128c512": (415_661_056, 705_021_196),
    "f32c32-sana-1.0": (153_027_104, 159_223_171),
}


def narrow(config: dict, head_dim: int = 8) -> dict:
  """A published config with tiny widths and depths but the same structure."""
  c = dict(config)
  widths = tuple(max(4, w // 32) for w in config["encoder_block_out_channels"])
  c.update(
      attention_head_dim=head_dim,
      latent_channels=config["latent_channels"] // 8,
      encoder_block_out_channels=widths, decoder_block_out_channels=widths,
      encoder_layers_per_block=tuple(min(d, 1) for d in config["encoder_layers_per_block"]),
      decoder_layers_per_block=tuple(min(d, 1) for d in config["decoder_layers_per_block"]))
  c.pop("scaling_factor")
  return c


def randomize_norms(module):
  """Non-trivial BatchNorm statistics and norm affines (fresh ones are the identity)."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
      if type(m).__name__ in ("BatchNorm2d", "RMSNorm") and m.weight is not None:
        m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
        if m.bias is not None:
          m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
  return module.eval()


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
  # Tiny models: torch's thread pool costs more CPU than it saves on this shared machine.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def fast_compile(fn, *args):
  """jit(fn) compiled with XLA's backend optimisations off: half the compile time, and the
  op-level numerics (what parity checks) are unchanged."""
  return jax.jit(fn).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})


def reference(config: dict, tmp_path, seed: int = 0):
  torch.manual_seed(seed)
  ref = randomize_norms(diffusers.AutoencoderDC(**config))
  ref.save_pretrained(str(tmp_path))
  return ref


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def check_parity(config: dict, tmp_path, hw):
  """Encode images and decode the reference latent with both; returns (enc, dec) errors."""
  ref = reference(config, tmp_path)
  model, variables = from_diffusers(str(tmp_path))
  x = np.random.RandomState(0).uniform(-1, 1, (2, config["in_channels"]) + hw)
  x = x.astype(np.float32)
  with torch.no_grad():
    z_ref = ref.encode(torch.from_numpy(x)).latent.numpy()
    y_ref = ref.decode(torch.from_numpy(z_ref)).sample.numpy()
  args = (variables, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(z_ref.transpose(0, 2, 3, 1)))
  z, y = fast_compile(lambda v, x, z: (model.apply(v, x, method="encode"),
                                       model.apply(v, z, method="decode")), *args)(*args)
  assert z.shape == z_ref.transpose(0, 2, 3, 1).shape
  assert y.shape == y_ref.transpose(0, 2, 3, 1).shape
  errs = (rel_err(np.asarray(z).transpose(0, 3, 1, 2), z_ref),
          rel_err(np.asarray(y).transpose(0, 3, 1, 2), y_ref))
  print(f"parity rel err encode {errs[0]:.2e} decode {errs[1]:.2e}")
  assert errs[0] < TOL and errs[1] < TOL, errs
  return model, variables


# Non-square inputs; the deepest stage has H*W <= head_dim (8) in the first three, so the
# quadratic attention form runs there and the linear one at the stage before.
@pytest.mark.parametrize("variant,hw", [
    ("f32c32-in-1.0", (64, 128)),      # latent 2x4
    ("f64c128-mix-1.0", (64, 128)),    # latent 1x2
    ("f128c512-in-1.0", (128, 256)),   # latent 1x2
    ("f32c32-sana-1.0", (96, 64)),     # latent 3x2, conv down / interpolate up, scales (5,)
])
def test_variant_structure_parity(variant, hw, tmp_path):
  check_parity(narrow(dcae_config(variant)), tmp_path, hw)


BASE = dict(in_channels=3, latent_channels=8, attention_head_dim=8,
            encoder_block_out_channels=(8, 16, 16, 32), decoder_block_out_channels=(8, 16, 16, 32),
            encoder_qkv_multiscales=((), (), (), ()), decoder_qkv_multiscales=((), (), (), ()))

OPTIONS = {
    # Depth-0 first stage with a stride-2 conv in / interpolate out; no in/out shortcuts;
    # one and two extra attention scales; EfficientViT stages with BatchNorm; silu head;
    # per-stage block types / norms / acts in every combination.
    "conv_interpolate": dict(
        encoder_block_types=("ResBlock", "EfficientViTBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock", "ResBlock"),
        encoder_layers_per_block=(0, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1),
        encoder_qkv_multiscales=((), (3, 5), (), (5,)),
        decoder_qkv_multiscales=((), (3,), (3, 5), ()),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns=("relu", "silu", "relu", "silu"),
        encoder_out_shortcut=False, decoder_in_shortcut=False, decoder_conv_act_fn="silu"),
    # Depth > 0 first stage with pixel-(un)shuffle blocks; one string for all stages;
    # widths that shrink and grow across stages (shortcut groups of 1 and 8, repeats of
    # 2 and 8); empty middle stages (no resampling there, as upstream).
    "unshuffle_shuffle": dict(
        encoder_block_types="EfficientViTBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 32, 16, 16), decoder_block_out_channels=(16, 8, 16, 32),
        encoder_layers_per_block=(1, 1, 0, 1), decoder_layers_per_block=(1, 1, 1, 0),
        encoder_qkv_multiscales=((5,), (), (), (3,)),
        downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
        decoder_norm_types="batch_norm", decoder_act_fns="relu"),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_parity(name, tmp_path):
  # Latent 5x3 (f8): H*W = 15 > head_dim, the linear form in the deepest stage.
  check_parity(dict(BASE, **OPTIONS[name]), tmp_path, (40, 24))


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("arch", sorted(PARAM_COUNTS))
def test_param_counts(arch):
  variant = arch if "sana" in arch else arch + "-in-1.0"
  model = MODELS.get("dcae")(variant=variant)
  shapes = convert_dcae.abstract_variables(model)  # jax.eval_shape: no memory used.
  enc, dec = _count(shapes["params"]["encoder"]), _count(shapes["params"]["decoder"])
  print(f"{arch}: encoder {enc:,} decoder {dec:,}")
  assert (enc, dec) == PARAM_COUNTS[arch]
  # The same counts from diffusers' AutoencoderDC built on the meta device (no memory).
  config = {k: v for k, v in dcae_config(variant).items()}
  with torch.device("meta"):
    ref = diffusers.AutoencoderDC(**config)
  assert enc == sum(p.numel() for p in ref.encoder.parameters())
  assert dec == sum(p.numel() for p in ref.decoder.parameters())
  # BatchNorm statistics: 12,800 for the in/mix decoders (256 x 5 + 512 x 10 channels, x2).
  bn = _count(shapes.get("batch_stats", {}))
  assert bn == (0 if "sana" in arch else 12_800)


def test_named_variants():
  assert len(VARIANTS) == 7
  assert dcae_config("mit-han-lab/dc-ae-f64c128-mix-1.0-diffusers")["scaling_factor"] == 0.4538
  assert dcae_config("dc-ae-f32c32-sana-1.0")["scaling_factor"] == 0.41407
  assert dcae(variant="f128c512-in-1.0").spatial_compression_ratio == 128
  with pytest.raises(ConfigError, match="unknown DC-AE variant"):
    dcae_config("f16c16-in-1.0")


def test_conversion_errors_name_tensors(tmp_path):
  config = narrow(dcae_config("f32c32-in-1.0"))
  ref = reference(config, tmp_path)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  convert_dcae.convert_diffusers_state(config, state)  # Complete: no error.
  broken = dict(state)
  del broken["decoder.up_blocks.1.1.norm.running_var"]
  broken["encoder.conv_out.weight"] = np.zeros((1, 1, 3, 3), np.float32)
  broken["encoder.extra.weight"] = np.zeros((2,), np.float32)
  with pytest.raises(WeightsError) as e:
    convert_dcae.convert_diffusers_state(config, broken)
  msg = str(e.value)
  assert "batch_stats/decoder/up_blocks_1_1/conv2/norm/var" in msg
  assert "params/encoder/conv_out/kernel" in msg and "(3, 3, 1, 1)" in msg
  assert "encoder.extra.weight" in msg
  # A config that does not belong to the weights.
  with pytest.raises(WeightsError, match="shape mismatch"):
    convert_dcae.convert_diffusers_state(dict(config, latent_channels=8), state)


def to_original(state: dict) -> dict:
  """diffusers AutoencoderDC names -> efficientvit DC-AE names (the test fixture layout)."""
  import re  # pylint: disable=g-import-not-at-top
  out = {}
  qkv = {}
  for key, v in state.items():
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
      stage = f"{m.group(1)}.stages.{m.group(3)}.op_list.{m.group(4)}"
      rest = m.group(5)
      q = re.fullmatch(r"attn\.to_([qkv])\.weight", rest)
      if q:
        qkv.setdefault(stage, {})[q.group(1)] = v
        continue
      rules = [
          (r"conv1\.(\w+)", r"main.conv1.conv.\1"), (r"conv2\.(\w+)", r"main.conv2.conv.\1"),
          (r"norm\.(\w+)", r"main.conv2.norm.\1"), (r"conv\.(\w+)", r"main.conv.conv.\1"),
          (r"attn\.to_out\.weight", r"context_module.main.proj.conv.weight"),
          (r"attn\.norm_out\.(\w+)", r"context_module.main.proj.norm.\1"),
          (r"attn\.to_qkv_multiscale\.(\d+)\.proj_in\.weight",
           r"context_module.main.aggreg.\1.0.weight"),
          (r"attn\.to_qkv_multiscale\.(\d+)\.proj_out\.weight",
           r"context_module.main.aggreg.\1.1.weight"),
          (r"conv_out\.conv_(inverted|depth|point)\.(\w+)", r"local_module.main.\1_conv.conv.\2"),
          (r"conv_out\.norm\.(\w+)", r"local_module.main.point_conv.norm.\1"),
      ]
      for pat, rep in rules:
        if re.fullmatch(pat, rest):
          new = re.sub(pat, rep, rest)
          if new.endswith("to_out.weight") or new.endswith("proj.conv.weight"):
            v = v[:, :, None, None]
          out[f"{stage}.{new}"] = v
          break
      else:
        raise AssertionError(key)
      continue
    rules = [
        (r"encoder\.conv_in\.conv\.(\w+)", r"encoder.project_in.conv.conv.\1"),
        (r"encoder\.conv_in\.(\w+)", r"encoder.project_in.conv.\1"),
        (r"encoder\.conv_out\.(\w+)", r"encoder.project_out.main.op_list.0.conv.\1"),
        (r"decoder\.conv_in\.(\w+)", r"decoder.project_in.main.conv.\1"),
        (r"decoder\.norm_out\.(\w+)", r"decoder.project_out.op_list.0.\1"),
        (r"decoder\.conv_out\.conv\.(\w+)", r"decoder.project_out.op_list.2.conv.conv.\1"),
        (r"decoder\.conv_out\.(\w+)", r"decoder.project_out.op_list.2.conv.\1"),
    ]
    for pat, rep in rules:
      if re.fullmatch(pat, key):
        out[re.sub(pat, rep, key)] = v
        break
    else:
      raise AssertionError(key)
  for stage, parts in qkv.items():
    w = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)[:, :, None, None]
    out[f"{stage}.context_module.main.qkv.conv.weight"] = w
  return out


@pytest.mark.parametrize("variant", ["f32c32-in-1.0", "f32c32-sana-1.0"])
def test_original_layout(variant, tmp_path):
  from diffusers.loaders.single_file_utils import (  # pylint: disable=g-import-not-at-top
      convert_autoencoder_dc_checkpoint_to_diffusers)
  config = narrow(dcae_config(variant))
  ref = reference(config, tmp_path / "diffusers")
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  original = to_original(state)
  # The fixture is the efficientvit layout as diffusers' own single-file converter reads it.
  back = convert_autoencoder_dc_checkpoint_to_diffusers(
      {k: torch.from_numpy(v) for k, v in original.items()})
  assert sorted(back) == sorted(state)
  for k, v in back.items():
    np.testing.assert_array_equal(v.numpy(), state[k])

  _, expected = from_diffusers(str(tmp_path / "diffusers"))
  src = tmp_path / "original"
  src.mkdir()
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(original, str(src / "model.safetensors"))
  with open(src / "config.json", "w") as f:
    json.dump({"model_name": "dc-ae-" + variant}, f)
  pt = str(tmp_path / "ckpt.pt")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in original.items()}}, pt)
  for path in (str(src), pt):
    _, variables = convert_dcae.from_original(path, config=config)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The named full-size variant does not fit these narrowed weights, and says which tensors.
  with pytest.raises(WeightsError, match="shape mismatch"):
    convert_dcae.from_original(str(src))


def test_original_pickle_refused(tmp_path):
  """A .pt holding arbitrary objects is not unpickled (torch.load(weights_only=True))."""
  path = str(tmp_path / "bad.pt")
  torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": fractions.Fraction(1, 3)}, path)
  with pytest.raises(WeightsError, match="weights_only"):
    convert_dcae.from_original(path, name="dc-ae-f32c32-in-1.0")


def _attention_closed_form(qkv, d):
  """sum_m v_m (k_m . q_n) / sum_m (k_m . q_n) per group of 3*d channels, in float64."""
  b, h, w, c = qkv.shape
  x = qkv.astype(np.float64).reshape(b, h * w, c // (3 * d), 3 * d)
  q, k, v = np.maximum(x[..., :d], 0), np.maximum(x[..., d:2 * d], 0), x[..., 2 * d:]
  a = np.einsum("bmge,bnge->bgmn", k, q)
  out = np.einsum("bmgd,bgmn->bngd", v, a) / (a.sum(2).transpose(0, 2, 1)[..., None] + 1e-15)
  return out.reshape(b, h, w, -1)


@pytest.mark.parametrize("hw", [(3, 5), (2, 4)])  # H*W 15 > 8: linear form; 8 <= 8: quadratic
def test_lite_mla_attention_closed_form_fp32(hw):
  """LiteMLA's attention equals its closed form and runs in fp32 for bf16 inputs."""
  qkv = np.random.RandomState(0).randn(2, *hw, 2 * 3 * 8).astype(np.float32)
  out = relu_linear_attention(jnp.asarray(qkv), 8)
  assert out.dtype == jnp.float32 and out.shape == (2, *hw, 16)
  np.testing.assert_allclose(np.asarray(out), _attention_closed_form(qkv, 8), rtol=1e-4,
                             atol=1e-5)
  assert relu_linear_attention(jnp.asarray(qkv, jnp.bfloat16), 8).dtype == jnp.float32


def random_variables(model, x, seed: int = 0):
  """Random variables of init's shapes, made in numpy (jit-compiling init takes long on CPU)."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return rng.randn(*shape).astype(np.float32) / np.sqrt(np.prod(shape[:-1]))
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return 0.1 * rng.randn(*shape).astype(np.float32)

  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_bf16_forward():
  """Under bf16 compute the model stays finite and close to fp32 (params stay fp32)."""
  config = dict(BASE, **OPTIONS["conv_interpolate"])
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 16, 24, 3)), jnp.float32)
  model = dcae(**config)
  variables = random_variables(model, x)
  run = lambda m: fast_compile(lambda v, x: m.apply(v, x, method="encode"), variables, x)(
      variables, x)
  z32, z16 = run(model), run(dcae(dtype=jnp.bfloat16, **config))
  assert z16.dtype == jnp.bfloat16 and bool(jnp.isfinite(z16).all())
  err = rel_err(np.asarray(z16, np.float32), np.asarray(z32))
  print(f"bf16 vs fp32 encode rel err {err:.2e}")
  assert err < 5e-2


class _CondConv(nn.Module):
  """A stand-in for CaT's condition-aware conv: the base conv's output scaled per sample."""
  features: int
  kernel_size: tuple
  strides: tuple
  padding: tuple
  feature_group_count: int
  use_bias: bool
  dtype: object = None

  @nn.compact
  def __call__(self, x, cond):
    y = nn.Conv(self.features, self.kernel_size, self.strides, self.padding,
                feature_group_count=self.feature_group_count, use_bias=self.use_bias,
                name="base")(x)
    return y * (1 + cond[:, None, None, :])


@pytest.mark.parametrize("block", ["MBConv", "FusedMBConv"])
def test_conv_substitution(block):
  """MBConv's depthwise / FusedMBConv's spatial conv can be replaced; call kwargs reach it."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, 6, 10, 8), jnp.float32)
  if block == "MBConv":
    module = MBConv(8, expand_ratio=2, strides=2, norm=None, act=("silu", "silu", None),
                    depthwise_conv_cls=_CondConv)
    sub, mid = "depth_conv", 16
  else:
    module = FusedMBConv(8, expand_ratio=2, strides=2, norm=None, act=("silu", None),
                         spatial_conv_cls=_CondConv)
    sub, mid = "spatial_conv", 16
  cond0, cond1 = jnp.zeros((2, mid)), jnp.ones((2, mid))
  variables = module.init(jax.random.PRNGKey(0), x, cond=cond0)
  assert "base" in variables["params"][sub]["conv"]
  y0, y1 = module.apply(variables, x, cond=cond0), module.apply(variables, x, cond=cond1)
  assert y0.shape == (2, 3, 5, 8)
  assert not np.allclose(np.asarray(y0), np.asarray(y1))
