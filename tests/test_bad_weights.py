"""Bad weights on disk: every reader names the file and what was expected in one WeightsError,
and `python -m jaxgen.convert` prints it as one `error:` line with exit code 2.

The bad files are the ones interrupted or failed hub downloads leave: truncated, empty, a
pickle / zip / HTML error page / Git LFS pointer under the .safetensors name, a missing or
broken-link weights file, an empty or invalid config.json. A tiny transformers CLIP directory
also goes through the convert CLI (dispatch on config.json's model_type) and back through
load_converted, matching transformers.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file as torch_load_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jaxgen.convert import __main__ as convert_cli  # noqa: E402
from jaxgen.convert import from_diffusers, from_transformers, load_converted  # noqa: E402
from jaxgen.convert.common import read_model_dir, read_safetensors  # noqa: E402
from jaxgen.errors import WeightsError  # noqa: E402

TOWER = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny transformers CLIPModel (both towers) saved as save_pretrained writes it."""
  config = transformers.CLIPConfig(
      text_config=dict(TOWER, vocab_size=40, max_position_embeddings=8, bos_token_id=38,
                       eos_token_id=39, pad_token_id=39),
      vision_config=dict(TOWER, image_size=16, patch_size=8), projection_dim=8)
  torch.manual_seed(0)
  ref = transformers.CLIPModel(config).eval()
  path = tmp_path_factory.mktemp("clip")
  ref.save_pretrained(str(path), safe_serialization=True)
  return str(path), ref


def _copy_dir(src, dst, weights_bytes=None):
  """`src`'s config.json and model.safetensors in `dst` (weights replaced by `weights_bytes`)."""
  os.makedirs(dst, exist_ok=True)
  for name in ("config.json", "model.safetensors"):
    with open(os.path.join(src, name), "rb") as f:
      data = f.read()
    if name == "model.safetensors" and weights_bytes is not None:
      data = weights_bytes(data)
    with open(os.path.join(dst, name), "wb") as f:
      f.write(data)
  return str(dst)


def _convert(capsys, src, dst):
  """(exit code, stderr lines) of the convert CLI."""
  code = convert_cli.main([f"--src={src}", f"--dst={dst}"])
  return code, capsys.readouterr().err.strip().splitlines()


def _torch_save_bytes(new_zipfile: bool) -> bytes:
  buffer = io.BytesIO()
  torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=new_zipfile)
  return buffer.getvalue()


def test_read_safetensors_matches_library(tmp_path):
  tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3),
             "i64": torch.arange(6), "bool": torch.tensor([True, False]),
             "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3)}
  tensors["bf16"] = tensors["bf16"].bfloat16()
  path = str(tmp_path / "w.safetensors")
  save_file(tensors, path, metadata={"format": "pt"})
  got, want = read_safetensors(path), torch_load_file(path)
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].shape == tuple(value.shape), name
    np.testing.assert_array_equal(np.asarray(got[name], np.float32), value.float().numpy())
  assert got["bf16"].dtype.name == "bfloat16" and got["f16"].dtype == np.float16


BAD_WEIGHTS = {
    "truncated": (lambda data: data[: len(data) // 2], "truncated"),
    "truncated_header": (lambda data: data[:40], "truncated"),
    "empty": (lambda data: b"", "empty"),
    "pickle": (lambda data: _torch_save_bytes(False), "pickle"),
    "torch_zip": (lambda data: _torch_save_bytes(True), "zip"),
    "html": (lambda data: b"<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>\n",
             "HTML"),
    "lfs_pointer": (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n",
                    "Git LFS"),
}


@pytest.mark.parametrize("kind", sorted(BAD_WEIGHTS))
def test_bad_weights_file_is_one_error_line(clip_dir, tmp_path, capsys, kind):
  damage, words = BAD_WEIGHTS[kind]
  src = _copy_dir(clip_dir[0], tmp_path / "src", damage)
  weights = os.path.join(src, "model.safetensors")
  with pytest.raises(WeightsError, match=words) as err:
    read_safetensors(weights)
  assert weights in str(err.value) and "\n" not in str(err.value)
  code, lines = _convert(capsys, src, tmp_path / "dst")
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("error: ") and weights in lines[0] and words in lines[0]
  assert not os.path.exists(tmp_path / "dst")


def test_diffusers_dir_truncated_and_missing(tmp_path, capsys):
  """The reported case: a truncated diffusion_pytorch_model.safetensors; then none at all."""
  src = tmp_path / "vae"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  weights = str(src / DIFFUSERS_WEIGHTS)
  save_file({"w": torch.randn(64, 64)}, weights)
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) - 100)
  code, lines = _convert(capsys, src, tmp_path / "dst")
  assert code == 2 and len(lines) == 1 and weights in lines[0] and "truncated" in lines[0]
  os.remove(weights)
  (src / "diffusion_pytorch_model.bin").write_bytes(_torch_save_bytes(True))
  with pytest.raises(WeightsError, match="not found") as err:
    from_diffusers(str(src))
  assert weights in str(err.value) and "diffusion_pytorch_model.bin" in str(err.value)
  os.symlink(str(tmp_path / "blobs" / "abc123.incomplete"), weights)  # A hub cache mid-download.
  with pytest.raises(WeightsError, match="broken link") as err:
    from_diffusers(str(src))
  assert weights in str(err.value)


@pytest.mark.parametrize("config_text,words", [
    ("", "empty"), ('{"_class_name": "AutoencoderKL", ', "not JSON"),
    ("<html><body>404</body></html>", "HTML"), ("[1, 2]", "JSON list")])
def test_bad_config_json(clip_dir, tmp_path, capsys, config_text, words):
  src = _copy_dir(clip_dir[0], tmp_path / "src")
  config = os.path.join(src, "config.json")
  with open(config, "w") as f:
    f.write(config_text)
  for read in (lambda: read_model_dir(src, "model.safetensors"), lambda: from_transformers(src),
               lambda: from_diffusers(src)):
    with pytest.raises(WeightsError, match=words) as err:
      read()
    assert config in str(err.value)
  code, lines = _convert(capsys, src, tmp_path / "dst")
  assert code == 2 and len(lines) == 1 and config in lines[0] and words in lines[0]
  os.remove(config)
  with pytest.raises(WeightsError, match="not found") as err:
    from_transformers(src)
  assert config in str(err.value)


def test_config_naming_no_model(clip_dir, tmp_path, capsys):
  src = _copy_dir(clip_dir[0], tmp_path / "src")
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump({"hidden_size": 16}, f)
  code, lines = _convert(capsys, src, tmp_path / "dst")
  assert code == 2 and len(lines) == 1
  assert "config.json" in lines[0] and "model_type" in lines[0] and "--name" in lines[0]


def test_sharded_checkpoint(tmp_path):
  tensors = {f"layer{i}.weight": torch.randn(3, i + 1) for i in range(5)}
  shards = {"model-00001-of-00002.safetensors": ["layer0.weight", "layer1.weight"],
            "model-00002-of-00002.safetensors": ["layer2.weight", "layer3.weight",
                                                 "layer4.weight"]}
  for shard, names in shards.items():
    save_file({n: tensors[n] for n in names}, str(tmp_path / shard))
  weight_map = {n: shard for shard, names in shards.items() for n in names}
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
  got = read_safetensors(str(tmp_path / "model.safetensors"))  # The base name, as converters ask.
  assert sorted(got) == sorted(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(got[name], value.numpy())
  second = tmp_path / "model-00002-of-00002.safetensors"
  second.write_bytes(second.read_bytes()[:-8])
  with pytest.raises(WeightsError, match="truncated") as err:
    read_safetensors(str(tmp_path / "model.safetensors"))
  assert str(second) in str(err.value)
  second.unlink()
  with pytest.raises(WeightsError, match="lists it as a shard") as err:
    read_safetensors(str(tmp_path / "model.safetensors"))
  assert str(second) in str(err.value)


def test_clip_dir_converts_through_cli(clip_dir, tmp_path, capsys):
  src, ref = clip_dir
  dst = str(tmp_path / "clip_converted")
  assert convert_cli.main([f"--src={src}", f"--dst={dst}"]) == 0
  assert "transformers clip" in capsys.readouterr().out
  model, variables = load_converted(dst)
  assert model.projection_dim == 8 and model.vision_model.image_size == 16
  ids = np.array([[38, 5, 9, 17, 39, 39], [38, 3, 39, 39, 39, 39]])
  mask = (np.arange(6)[None] < np.array([[5], [3]])).astype(np.int32)
  pixels = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               pixel_values=torch.tensor(pixels))
  got = model.apply(variables, ids, pixels.transpose(0, 2, 3, 1), mask)
  for key in ("text_embeds", "image_embeds", "logits_per_text"):
    np.testing.assert_allclose(np.asarray(got[key]), getattr(want, key).numpy(), atol=1e-5,
                               err_msg=key)


def test_clip_mis_shaped_tensor_names_file(clip_dir, tmp_path, capsys):
  src = _copy_dir(clip_dir[0], tmp_path / "src")
  weights = os.path.join(src, "model.safetensors")
  state = torch_load_file(weights)
  state["text_model.final_layer_norm.weight"] = torch.ones(17)
  save_file(state, weights)
  code, lines = _convert(capsys, src, tmp_path / "dst")
  assert code == 2 and len(lines) == 1, lines
  assert weights in lines[0] and "text_model/final_layer_norm/scale" in lines[0]


def test_cli_subprocess_truncated_clip(clip_dir, tmp_path):
  """As a user runs it: one `error:` line on stderr, no traceback, exit code 2."""
  src = _copy_dir(clip_dir[0], tmp_path / "src", lambda data: data[:-1000])
  result = subprocess.run(
      [sys.executable, "-m", "jaxgen.convert", f"--src={src}", f"--dst={tmp_path / 'dst'}"],
      capture_output=True, text=True, timeout=300, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert os.path.join(src, "model.safetensors") in lines[0] and "truncated" in lines[0]
