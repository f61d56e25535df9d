"""Images from a published generator: `python -m jaxgen.generate --model=DIR ...`.

  python -m jaxgen.generate --model=DIR --labels=207,360 [--label_names="golden retriever"]
      [--num_per_label=4 --steps=25 --guidance=4 --scheduler=dpmpp_2m --seed=0 --out=DIR]
      [--batch_size=N --max_memory_gb=G --dtype=bfloat16]
  python -m jaxgen.generate --model=DIR --prompt="a photo of a cat" [--prompt=...]
      [--negative_prompt="blurry"] [--num_per_prompt=4 --height=512 --width=512]
      [--guidance_rescale=0.7 --clip_skip=1 --steps=25 --guidance=7.5 --scheduler=ddim ...]
  python -m jaxgen.generate --model=DIR --eval --num_samples=N --reference_stats=X.npz
      [--config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth]
      [--config.eval.metrics=fid,is,pr]

DIR is anything `jaxgen.pipelines.load_pipeline` reads (a diffusers pipeline directory or a
DC-AE diffusion checkpoint). Writes one PNG per image (`{index:05d}_class{id}.png`), a grid
with a labelled row per class (`grid.png`) and `images.npz` (uint8 images, labels). `--eval`
draws `num_samples` images with balanced labels (0, 1, ..., K-1, 0, ...) and scores them with
jaxgen's metrics against `--reference_stats` (mu, sigma[, features] as pytorch-fid's
--save-stats or jaxgen writes them; precision/recall and KID need the features); the result goes
to OUT/eval.json. Text-to-image pipelines (Stable Diffusion) take `--prompt` (repeat the flag
for several prompts; `--negative_prompt` once for all or once per prompt) and write
`{index:05d}.png`, a grid with a row per prompt and `images.npz` (uint8 images, prompts). Bad
input prints one `error:` line and exits with status 2.
"""

import os
import sys
import time
from typing import Dict, List, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from jaxgen.errors import ConfigError, cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Pipeline directory (diffusers or DC-AE diffusion).")
flags.DEFINE_list("labels", [], "Class ids, comma-separated.")
flags.DEFINE_list("label_names", [], "Class names (the pipeline's id2label), comma-separated.")
flags.DEFINE_integer("num_per_label", 1, "Images per label.")
flags.DEFINE_integer("steps", None, "Denoising steps (default: the checkpoint's recipe).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the recipe's).")
flags.DEFINE_string("scheduler", None, "Sampling algorithm (default: the directory's own).")
flags.DEFINE_integer("seed", 0, "Image i draws its noise from fold_in(PRNGKey(seed), i).")
flags.DEFINE_string("out", "generated", "Output directory.")
flags.DEFINE_integer("batch_size", None, "Images per compiled batch (default: all).")
flags.DEFINE_float("max_memory_gb", None, "Per-device memory budget for the compiled program.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter / activation dtype.")
flags.DEFINE_bool("eval", False, "Score num_samples images with jaxgen's metrics.")
flags.DEFINE_integer("num_samples", 1000, "Images for --eval.")
flags.DEFINE_string("reference_stats", "", "Reference statistics (.npz) for --eval.")
flags.DEFINE_multi_string("prompt", [], "Text prompt (text-to-image pipelines); repeatable.")
flags.DEFINE_multi_string("negative_prompt", [], "Negative prompt: one for all prompts or one "
                          "per prompt (default: the empty prompt).")
flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
flags.DEFINE_integer("height", None, "Image height (text-to-image; default: the model's).")
flags.DEFINE_integer("width", None, "Image width (text-to-image; default: the model's).")
flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale (Lin et al. 2023; text-to-image).")
flags.DEFINE_integer("clip_skip", None, "Text-encoder layers to skip (text-to-image).")


def eval_config() -> ml_collections.ConfigDict:
  """The `--config.eval.*` settings of --eval: the training configs' eval defaults
  (configs/common.py; jaxgen/metrics/evaluate.py names them)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({"eval": common.base_config().eval.to_dict()})


_CONFIG = config_flags.DEFINE_config_dict("config", eval_config(),
                                          "Evaluation settings (--config.eval.*).")


def requested_labels(pipe, ids: Sequence[str], names: Sequence[str]) -> List[int]:
  try:
    labels = [int(v) for v in ids]
  except ValueError:
    raise ConfigError(f"--labels takes class ids (integers), got {list(ids)}; use "
                      "--label_names for names.") from None
  labels += pipe.get_label_ids([n.strip() for n in names]) if names else []
  if not labels:
    raise ConfigError("no labels: pass --labels=ID,ID or --label_names=NAME,NAME (or --eval).")
  return labels


def write_images(out: str, images_u8: np.ndarray, labels: np.ndarray, pipe) -> Dict[str, str]:
  """One PNG per image, a labelled grid (a row per distinct label) and images.npz."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxgen import visualize  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  for i, (image, label) in enumerate(zip(images_u8, labels)):
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        os.path.join(out, f"{i:05d}_class{int(label)}.png"))
  distinct = list(dict.fromkeys(int(v) for v in labels))
  names = [f"{k} {pipe.id2label[str(k)].split(',')[0]}" if pipe.id2label and str(k) in
           pipe.id2label else str(k) for k in distinct]
  grid = os.path.join(out, "grid.png")
  visualize.save_labelled_grid(grid, [images_u8[labels == k] for k in distinct], names)
  npz = os.path.join(out, "images.npz")
  tmp = npz + ".tmp.npz"
  np.savez(tmp, images=images_u8, labels=labels)
  os.replace(tmp, npz)  # A reader never sees a partial file.
  return {"grid": grid, "npz": npz}


def write_prompt_images(out: str, images_u8: np.ndarray, prompts: Sequence[str]
                        ) -> Dict[str, str]:
  """One PNG per image, a grid with a row per prompt (its first words to the left) and
  images.npz (uint8 images, the prompt of each)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from jaxgen import visualize  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  for i, image in enumerate(images_u8):
    Image.fromarray(image).save(os.path.join(out, f"{i:05d}.png"))
  distinct = list(dict.fromkeys(prompts))
  prompts = np.asarray(prompts)
  grid = os.path.join(out, "grid.png")
  visualize.save_labelled_grid(grid, [images_u8[prompts == p] for p in distinct],
                               [p if len(p) <= 32 else p[:29] + "..." for p in distinct])
  npz = os.path.join(out, "images.npz")
  tmp = npz + ".tmp.npz"
  np.savez(tmp, images=images_u8, prompts=prompts)
  os.replace(tmp, npz)  # A reader never sees a partial file.
  return {"grid": grid, "npz": npz}


def generate_from_prompts(pipe, kwargs: Dict) -> int:
  """The text-to-image branch of `run`: --prompt (and --negative_prompt) -> images."""
  if FLAGS.eval or FLAGS.labels or FLAGS.label_names:
    raise ConfigError("--eval, --labels and --label_names need a class-conditional pipeline; "
                      f"{FLAGS.model} takes --prompt.")
  if not FLAGS.prompt:
    raise ConfigError(f"{FLAGS.model} is a text-to-image pipeline: pass --prompt=TEXT (repeat "
                      "the flag for several prompts).")
  negative = FLAGS.negative_prompt
  if len(negative) > 1 and len(negative) != len(FLAGS.prompt):
    raise ConfigError(f"{len(negative)} --negative_prompt flags for {len(FLAGS.prompt)} "
                      "prompts: pass one for all prompts or one per prompt.")
  n = len(FLAGS.prompt) * FLAGS.num_per_prompt
  images = pipe(FLAGS.prompt, negative_prompt=(negative[0] if len(negative) == 1 else
                                               negative or None),
                num_images_per_prompt=FLAGS.num_per_prompt, height=FLAGS.height,
                width=FLAGS.width, guidance_rescale=FLAGS.guidance_rescale,
                clip_skip=FLAGS.clip_skip, seed=FLAGS.seed,
                progress=progress_printer(f"generating {n} images", n), **kwargs)
  prompts = list(np.repeat(FLAGS.prompt, FLAGS.num_per_prompt))
  paths = write_prompt_images(FLAGS.out, pipe.to_uint8(images), prompts)
  print(f"wrote {n} images to {FLAGS.out} (grid: {paths['grid']})", flush=True)
  return 0


def progress_printer(what: str, total: int):
  start = time.perf_counter()
  done = [0]

  def update(n: int):
    done[0] += n
    elapsed = time.perf_counter() - start
    print(f"{what}: {done[0]}/{total} | {done[0] / max(elapsed, 1e-9):.2f} img/s | "
          f"elapsed {elapsed:.0f}s", file=sys.stderr, flush=True)
  return update


def evaluate_pipeline(pipe, config: ml_collections.ConfigDict, num_samples: int,
                      reference_stats: str, call_kwargs: Dict) -> Dict:
  """jaxgen's generator metrics (fd / pr / kid / is on a feature net) of `num_samples` images
  with balanced labels, against the statistics in `reference_stats`."""
  from jaxgen import sharding  # pylint: disable=g-import-not-at-top
  from jaxgen.metrics import evaluate  # pylint: disable=g-import-not-at-top
  from jaxgen.metrics import fid as fid_lib  # pylint: disable=g-import-not-at-top
  e = config.eval
  spec = e.get("metrics") or "fid,is"
  _, stats = evaluate.parse_metrics(spec, (), evaluate.GENERATOR_STATS)
  nets_needed = list(dict.fromkeys(net for _, net in stats))
  if "digits" in nets_needed:
    raise ConfigError("the digits net is trained on a config's data; a published generator is "
                      "scored with inception (or alexnet) features.")
  ref_nets = sorted({net for stat, net in stats if stat != "is"})
  if len(ref_nets) > 1:
    raise ConfigError(f"--reference_stats holds one feature net's statistics; the metrics "
                      f"{spec!r} need {ref_nets}: score one net per run.")
  if ref_nets and not reference_stats:
    raise ConfigError(f"{spec!r} compares against real data: pass --reference_stats=X.npz "
                      "(pytorch-fid --save-stats, or jaxgen's reference_<net>_*.npz).")
  nets = evaluate.build_nets(ml_collections.ConfigDict(dict(config.to_dict(), data={})),
                             nets_needed, e.get("cache_dir") or ".")
  refs = {net: dict(fid_lib.load_statistics(reference_stats), source=reference_stats)
          for net in ref_nets}
  evaluate.check_references(stats, refs)
  labels = evaluate.eval_labels(num_samples, pipe.num_classes)
  images = pipe(labels, progress=progress_printer(f"sampling {num_samples} images",
                                                  num_samples), **call_kwargs)
  runner = sharding.BatchRunner(pipe.mesh, int(call_kwargs.get("batch_size") or 64))
  fns, variables = evaluate.feature_fns(runner, nets)
  # Features of the uint8 images the reference pipeline would save, in [-1, 1].
  x = pipe.to_uint8(images).astype(np.float32) / 127.5 - 1.0
  fake = {n: runner.map(lambda _, batch, n=n: fns[n](variables[n], batch), x) for n in nets}
  result = {"num_samples": int(num_samples), "metrics": spec,
            **{k: v for k, v in call_kwargs.items() if v is not None}}
  result.update(evaluate.distribution_metrics(stats, refs, fake, e))
  return result


@cli
def run(argv: List[str]) -> int:
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {argv[1:]}; see --help.")
  if not FLAGS.model:
    raise ConfigError("--model=DIR is required (a diffusers pipeline directory or a DC-AE "
                      "diffusion checkpoint).")
  from jaxgen.metrics import evaluate  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines import load_pipeline  # pylint: disable=g-import-not-at-top
  from jaxgen.pipelines.base import ClassConditionalPipeline  # pylint: disable=g-import-not-at-top
  pipe = load_pipeline(FLAGS.model, dtype=FLAGS.dtype)
  kwargs = dict(num_inference_steps=FLAGS.steps, guidance_scale=FLAGS.guidance,
                scheduler=FLAGS.scheduler, batch_size=FLAGS.batch_size,
                max_memory_gb=FLAGS.max_memory_gb)
  if not isinstance(pipe, ClassConditionalPipeline):
    return generate_from_prompts(pipe, kwargs)
  if FLAGS.prompt:
    raise ConfigError(f"{FLAGS.model} is a class-conditional pipeline: pass --labels or "
                      "--label_names, not --prompt.")
  if FLAGS.eval:
    result = dict(model=FLAGS.model, **evaluate_pipeline(
        pipe, _CONFIG.value, FLAGS.num_samples, FLAGS.reference_stats,
        dict(kwargs, seed=FLAGS.seed)))
    path = os.path.join(FLAGS.out, "eval.json")
    evaluate.write_json(path, result)
    print(f"{evaluate.summary_line(result)}; wrote {path}", flush=True)
    return 0
  labels = np.repeat(requested_labels(pipe, FLAGS.labels, FLAGS.label_names),
                     FLAGS.num_per_label)
  images = pipe(labels, seed=FLAGS.seed,
                progress=progress_printer(f"generating {len(labels)} images", len(labels)),
                **kwargs)
  paths = write_images(FLAGS.out, pipe.to_uint8(images), labels, pipe)
  print(f"wrote {len(labels)} images to {FLAGS.out} (grid: {paths['grid']})", flush=True)
  return 0


def main():
  app.run(run)


if __name__ == "__main__":
  main()
