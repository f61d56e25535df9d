"""jax.export artifacts (jaxgen.export): a tiny random diffusers DiTPipeline exported for cpu and
called back through `load` (the same outputs as the pipeline), exported for cuda on this CPU,
the loader's dependencies, the CLI's errors, and the kernels a CUDA lowering picks."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxgen import export  # noqa: E402
from jaxgen.errors import ConfigError  # noqa: E402
from jaxgen.pipelines import load_pipeline  # noqa: E402

from test_pipelines import tiny_dit_pipeline  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, GUIDANCE, BATCH = 3, 3.0, 2
LABELS = np.array([207, 1], np.int32)


def _grouped_convs(exported) -> set:
  """feature_group_count values > 1 of the module's convolutions (depthwise: XLA's path)."""
  return {int(g) for g in re.findall(r"feature_group_count = (\d+)", exported.mlir_module())
          if int(g) > 1}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
  """(pipeline dir, diffusers pipe, cpu artifact dir, its manifest)."""
  path = str(tmp_path_factory.mktemp("dit_pipeline"))
  reference = tiny_dit_pipeline(path, sample_size=8)
  out = str(tmp_path_factory.mktemp("dit_export_cpu"))
  manifest = export.export_pipeline(path, out, platform="cpu", batch=BATCH, steps=STEPS,
                                    guidance=GUIDANCE)
  return path, reference, out, manifest


def test_cpu_artifacts_match_pipeline(dit):
  path, reference, out, manifest = dit
  pipe = load_pipeline(path)
  programs = export.load(out)
  assert sorted(programs) == sorted(export.ARTIFACTS)
  assert manifest["weights"]["count"] == len(jax.tree.leaves(pipe.variables))
  assert manifest["artifacts"]["sampler"]["inputs"] == [
      {"name": "noise", "shape": [BATCH, 8, 8, 4], "dtype": "float32"},
      {"name": "labels", "shape": [BATCH], "dtype": "int32"}]
  assert manifest["artifacts"]["decoder"]["outputs"] == [
      {"shape": [BATCH, 8 * 2, 8 * 2, 3], "dtype": "float32"}]
  rng = np.random.RandomState(0)
  noise = rng.randn(BATCH, 8, 8, 4).astype(np.float32)

  # The whole sampler: the pipeline's images from the same latents.
  want = pipe(LABELS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise)
  np.testing.assert_allclose(np.asarray(programs["sampler"](noise, LABELS)), want, atol=1e-5)

  latents = rng.randn(BATCH, 8, 8, 4).astype(np.float32)
  want = jax.jit(pipe.decode)(pipe.variables, latents)
  np.testing.assert_allclose(np.asarray(programs["decoder"](latents)), want, atol=1e-5)

  # One guided evaluation: diffusers' CFG of the raw transformer (doubled batch with the null
  # class 1000, guidance on the latent channels, the learned sigma from the conditional half).
  t = np.array([999.0, 321.0], np.float32)
  got = np.asarray(programs["denoiser"](latents, t, LABELS))
  direct = np.asarray(jax.jit(pipe.denoiser)(np.concatenate([latents] * 2), np.concatenate([t] * 2),
                                    np.concatenate([LABELS, [1000] * BATCH])))
  cond, uncond = direct[:BATCH], direct[BATCH:]
  guided = np.concatenate([uncond[..., :4] + GUIDANCE * (cond[..., :4] - uncond[..., :4]),
                           cond[..., 4:]], axis=-1)
  np.testing.assert_allclose(got, guided, atol=1e-5)
  with torch.no_grad():
    raw = reference.transformer(
        torch.from_numpy(np.concatenate([latents] * 2)).permute(0, 3, 1, 2),
        timestep=torch.from_numpy(np.concatenate([t] * 2)),
        class_labels=torch.from_numpy(np.concatenate([LABELS, [1000] * BATCH]).astype(np.int64)),
    ).sample.permute(0, 2, 3, 1).numpy()
  eps = raw[BATCH:, ..., :4] + GUIDANCE * (raw[:BATCH, ..., :4] - raw[BATCH:, ..., :4])
  np.testing.assert_allclose(got, np.concatenate([eps, raw[:BATCH, ..., 4:]], -1), atol=1e-4)

  with pytest.raises(ConfigError, match="must have shape"):
    programs["decoder"](latents[:1])


def test_cuda_export_on_cpu_via_cli(dit, tmp_path):
  path = dit[0]
  out = str(tmp_path / "cuda")
  proc = subprocess.run(
      [sys.executable, "-m", "jaxgen.export", f"--model={path}", "--platform=cuda",
       "--batch=1", f"--out={out}", "--steps=2", "--scheduler=dpmpp_2m", "--dtype=bfloat16"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, export.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["platform"] == "cuda" and manifest["dtype"] == "bfloat16"
  assert manifest["jax_version"] == jax.__version__
  for name, entry in manifest["artifacts"].items():
    with open(os.path.join(out, entry["file"]), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    assert exported.platforms == ("cuda",), name
    # Only jax.export's stable targets got through its check (random bits: threefry's FFI).
    assert not any("triton" in c for c in entry["custom_calls"]), entry["custom_calls"]
    weights = exported.in_avals[:manifest["weights"]["count"]]  # As exported: bf16.
    assert {a.dtype for a in weights} == {jnp.dtype(jnp.bfloat16)}, name


def test_loader_needs_only_jax(dit):
  """A process that never imports flax / torch / diffusers runs the artifacts."""
  out = dit[2]
  code = (
      "import sys, numpy as np\n"
      "from jaxgen.export import load\n"
      f"programs = load({out!r})\n"
      f"images = programs['decoder'](np.zeros(({BATCH}, 8, 8, 4), np.float32))\n"
      f"assert images.shape == ({BATCH}, 16, 16, 3), images.shape\n"
      "heavy = [m for m in ('flax', 'torch', 'diffusers', 'transformers', 'optax') "
      "if m in sys.modules]\n"
      "assert not heavy, heavy\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_bad_model_one_error_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxgen.export", f"--model={tmp_path / 'nosuch'}",
       f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "nosuch" in lines[0], lines


def test_cuda_lowering_takes_xla_kernels():
  """A DC-AE decoder and CAN's per-sample depthwise conv lowered for cuda on this CPU: XLA's
  grouped convs (no shifted sums, no Pallas-Triton custom call); for cpu the shifted sums."""
  from test_dcae import random_variables  # pylint: disable=g-import-not-at-top
  from jaxgen.models.dcae import dcae  # pylint: disable=g-import-not-at-top
  from jaxgen.nn.condition_aware import CADepthwiseConv  # pylint: disable=g-import-not-at-top
  # Two stages, the second EfficientViT (GLUMBConv's 3x3 depthwise conv).
  model = dcae(in_channels=3, latent_channels=4, attention_head_dim=8,
               encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
               encoder_block_types=("ResBlock", "EfficientViTBlock"),
               decoder_block_types=("ResBlock", "EfficientViTBlock"),
               encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
               encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()))
  variables = random_variables(model, jnp.zeros((1, 8, 8, 3)))
  z = jax.ShapeDtypeStruct((1, 4, 4, 4), jnp.float32)
  decode = lambda v, z: model.apply(v, z, method="decode")
  cuda = export.export_function(decode, variables, [z], "cuda")
  cpu = export.export_function(decode, variables, [z], "cpu")
  assert export.custom_call_targets(cuda) == []
  depthwise = {g for g in _grouped_convs(cuda) if g not in _grouped_convs(cpu)}
  assert depthwise, "the CUDA decoder should hold XLA depthwise convs where cpu has shifts"
  assert jax.default_backend() == "cpu"  # Lowering for cuda left this machine's choice alone.

  x = jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32)
  cond = jax.ShapeDtypeStruct((2, 16), jnp.float32)
  for impl, ok in (("auto", True), ("pallas", False)):
    layer = CADepthwiseConv(features=8, impl=impl)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                          jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, cond))
    apply = lambda v, x, c, layer=layer: layer.apply(v, x, c)
    if ok:
      exported = export.export_function(apply, params, [x, cond], "cuda")
      assert export.custom_call_targets(exported) == [] and _grouped_convs(exported)
    else:  # A forced Pallas kernel: jax.export's own check refuses the Triton custom call.
      with pytest.raises(ValueError, match="custom calls whose targets"):
        export.export_function(apply, params, [x, cond], "cuda")


def test_dcae_diffusion_export(tmp_path):
  """The DC-AE paper's U-ViT pipeline (a tiny random efficientvit-layout checkpoint): the cpu
  denoiser is its guided evaluation (cond + (s - 1)(cond - uncond), null class num_classes);
  its decoder lowered for cuda holds XLA's depthwise convs and no custom call."""
  from test_dcae import narrow, randomize_norms, to_original  # pylint: disable=g-import-not-at-top
  from test_efficientvit_diffusion import make_checkpoint  # pylint: disable=g-import-not-at-top
  from jaxgen.models.dcae import dcae_config  # pylint: disable=g-import-not-at-top
  config = narrow(dcae_config("f32c32-in-1.0"))
  torch.manual_seed(0)
  ae = randomize_norms(diffusers.AutoencoderDC(**config))
  state = to_original({k: v.numpy() for k, v in ae.state_dict().items()})
  path, _ = make_checkpoint(tmp_path / "ckpt", "uvit", (ae, config, state), seed=2)
  scale = 4.0
  manifest = export.export_pipeline(path, str(tmp_path / "cpu"), platform="cpu", batch=2,
                                    guidance=scale, artifacts=["denoiser"])
  assert manifest["pipeline"] == "DCAEDiffusionPipeline"
  pipe = load_pipeline(path)
  x = pipe.noise(0, 2)
  t, labels = np.array([250.0, 900.0], np.float32), np.array([3, 7], np.int32)
  got = np.asarray(export.load(str(tmp_path / "cpu"))["denoiser"](x, t, labels))
  denoise = jax.jit(pipe.denoiser)
  cond = np.asarray(denoise(x, t, labels))
  uncond = np.asarray(denoise(x, t, np.full(2, pipe.num_classes, np.int32)))
  np.testing.assert_allclose(got, cond + (scale - 1) * (cond - uncond), atol=1e-5)

  manifest = export.export_pipeline(path, str(tmp_path / "cuda"), platform="cuda",
                                    artifacts=["decoder"])
  assert manifest["artifacts"]["decoder"]["custom_calls"] == []
  with open(tmp_path / "cuda" / manifest["artifacts"]["decoder"]["file"], "rb") as f:
    assert _grouped_convs(jax.export.deserialize(bytearray(f.read())))
