"""python -m jaxgen.convert (diffusers dir -> converted dir) and python -m jaxgen.reconstruct."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxgen import reconstruct  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxgen.convert import __main__ as convert_cli  # noqa: E402
from jaxgen.convert import load_autoencoder, load_converted  # noqa: E402
from jaxgen.convert.saved import META_NAME  # noqa: E402
from jaxgen.data import embedded  # noqa: E402
from jaxgen.models.dcae import DCAE  # noqa: E402

# A tiny f32 AutoencoderDC: the f32c32 structure (6 stages, ResBlock x3 + EfficientViT x3,
# BatchNorm decoder stages), narrowed.
TINY = dict(
    in_channels=3, latent_channels=4, attention_head_dim=8,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(4, 8, 8, 8, 16, 16), decoder_block_out_channels=(4, 8, 8, 8, 16, 16),
    encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
    encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
    downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
    decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
    decoder_act_fns=("relu",) * 3 + ("silu",) * 3, scaling_factor=0.5)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
  torch.manual_seed(0)
  torch.set_num_threads(1)
  ref = diffusers.AutoencoderDC(**TINY)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # Non-trivial BatchNorm statistics.
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
  ref.eval()
  path = tmp_path_factory.mktemp("dcae_diffusers")
  ref.save_pretrained(str(path))
  return str(path), ref


@pytest.fixture(scope="module")
def converted_dir(diffusers_dir, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("converted") / "tiny")
  assert convert_cli.main([f"--src={diffusers_dir[0]}", f"--dst={dst}"]) == 0
  return dst


def test_convert_writes_loadable_checkpoint(diffusers_dir, converted_dir):
  with open(os.path.join(converted_dir, META_NAME)) as f:
    meta = json.load(f)
  assert meta["module"] == "jaxgen.models.dcae.DCAE"
  assert meta["fields"]["scaling_factor"] == 0.5
  model, variables = load_converted(converted_dir)
  assert isinstance(model, DCAE) and model.spatial_compression_ratio == 32
  assert set(variables) == {"params", "batch_stats"}
  assert meta["num_params"] == sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
  # The converted model computes what diffusers computes (non-square input, eval mode).
  ref = diffusers_dir[1]
  x = np.random.RandomState(0).uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32)
  with torch.no_grad():
    z_ref = ref.encode(torch.from_numpy(x)).latent.numpy().transpose(0, 2, 3, 1)
    y_ref = ref.decode(torch.from_numpy(z_ref.transpose(0, 3, 1, 2))).sample.numpy()
  z = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), method="encode")
  y = model.apply(variables, jnp.asarray(z_ref), method="decode")
  np.testing.assert_allclose(np.asarray(z), z_ref, atol=1e-4 * np.abs(z_ref).max())
  np.testing.assert_allclose(np.asarray(y), y_ref.transpose(0, 2, 3, 1),
                             atol=1e-4 * np.abs(y_ref).max())
  # load_autoencoder reads the converted dir and the diffusers dir alike.
  _, again = load_autoencoder(converted_dir)
  _, direct = load_autoencoder(diffusers_dir[0])
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_errors(tmp_path, capsys, converted_dir, diffusers_dir):
  assert convert_cli.main([f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'out'}"]) == 2
  assert "error:" in capsys.readouterr().err
  assert convert_cli.main([f"--src={diffusers_dir[0]}", f"--dst={converted_dir}"]) == 2
  assert "already exists" in capsys.readouterr().err
  assert convert_cli.main(["--src=x"]) == 2


def test_reconstruct_cli_any_size_tiled(converted_dir, tmp_path, capsys):
  """A real photo crop of a size that is no multiple of 32 (padded), tiled at 64 px."""
  photo = embedded.load_photo("coffee.png")[:100, :150]
  src, out_tiled, out_whole = (str(tmp_path / n) for n in ("in.png", "tiled.png", "whole.png"))
  Image.fromarray(photo).save(src)
  assert reconstruct.main([f"--checkpoint={converted_dir}", src, out_tiled, "--tile=64"]) == 0
  assert "PSNR" in capsys.readouterr().out
  assert reconstruct.main([f"--checkpoint={converted_dir}", src, out_whole]) == 0
  tiled, whole = np.asarray(Image.open(out_tiled)), np.asarray(Image.open(out_whole))
  assert tiled.shape == whole.shape == photo.shape
  # Tiled (128x160 padded, 64 px tiles every 32 px) vs one piece: same shape, finite, and
  # different (the attention sees only a tile's context), so the tiled path really ran.
  model, variables = load_converted(converted_dir)
  image = photo.astype(np.float32) / 127.5 - 1
  a = reconstruct.reconstruct_image(model, variables, image, tile=64, stride=32)
  b = reconstruct.reconstruct_image(model, variables, image)
  assert a.shape == b.shape == image.shape and np.isfinite(a).all()
  assert not np.allclose(a, b)
  assert reconstruct.main([f"--checkpoint={converted_dir}", src, out_tiled, "--tile=33"]) == 2
  assert "multiple of the compression ratio" in capsys.readouterr().err
  assert reconstruct.main([f"--checkpoint={converted_dir}", str(tmp_path / "missing.png"),
                           out_tiled]) == 2
