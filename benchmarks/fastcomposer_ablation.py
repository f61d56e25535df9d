"""FastComposer ablation: localisation loss on/off x delayed subject conditioning on/off.

  python -m benchmarks.fastcomposer_ablation [--workdir=workdirs/fastcomposer_ablation] \
      [--num_prompts=300] [--md=OUT.md] [--config.a.b=value ...]

Trains configs/fastcomposer_mnist.py twice in WORKDIR/<arm> with `jaxgen.train.loop.train`
("loc": diffusion.loc_loss_weight as configured; "no_loc": 0; a finished workdir is only read,
an interrupted one resumes), then samples the same first num_prompts fixed test compositions
(jaxgen.data.subjects; the same seed for every row) with subject conditioning from the first
step (subject_start 0) and delayed (the config's sample.subject_start), and scores them with
`jaxgen.tasks.fastcomposer.subject_scores` under a digit classifier trained once on the real
MNIST-5k digits at the half-canvas size (cached in WORKDIR/classifier):

  prompt consistency  the requested digit is read in the requested half (per subject)
  identity            cosine of the classifier's penultimate features, reference vs its half
  attention in place  share of the subject token's cross-attention inside the requested half
                      (jaxgen.tasks.fastcomposer.attention_readout), on the generated canvases
                      and, per arm, on the real compositions of the same prompts ("real canvases":
                      does the token attend to its subject)

"real compositions" scores the dataset's own canvases (consistency = the classifier's accuracy
on those digits, identity 1) and "same class, other digit" the identity of a different real
digit of the requested class: identity above that line is identity, not just class, transfer.
Extra --config.a.b=value arguments override both arms (e.g. --config.training.steps=600).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "fastcomposer_mnist.py")
ARMS = {"loc": "", "no_loc": ":no_loc"}


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.fastcomposer_ablation",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="workdirs/fastcomposer_ablation")
  p.add_argument("--num_prompts", type=int, default=None, help="default: config eval.num_samples")
  p.add_argument("--md", default=None, help="default: WORKDIR/results.md")
  args, rest = p.parse_known_args(argv)
  args.overrides = []
  for item in rest:
    if not item.startswith("--config."):
      p.error(f"unrecognized argument {item!r}")
    args.overrides.append(item[len("--config."):])
  return args


COLUMNS = (("prompt_consistency", "prompt consistency"),
           ("prompt_consistency_two_subjects", "consistency (2 subjects)"),
           ("identity", "identity"), ("identity_two_subjects", "identity (2 subjects)"),
           ("attention_in_place", "attention in place"))


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxgen.config import load_config  # pylint: disable=g-import-not-at-top
  from jaxgen.data import subjects  # pylint: disable=g-import-not-at-top
  from jaxgen.tasks import fastcomposer as fc_task  # pylint: disable=g-import-not-at-top
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top

  cache = os.path.join(args.workdir, "classifier")
  overrides = args.overrides + [f"eval.cache_dir={cache}"]
  if args.num_prompts:
    overrides.append(f"eval.num_samples={args.num_prompts}")
  configs = {arm: load_config(CONFIG + preset, overrides) for arm, preset in ARMS.items()}
  first = configs["loc"]
  delayed = float(first.sample.subject_start)
  examples = subjects.load_examples(first.data, "test", int(first.eval.num_samples))
  rows, real_attention = [], {}
  for arm, config in configs.items():
    workdir = os.path.join(args.workdir, arm)
    tic = time.perf_counter()
    setup = loop.train(config, workdir)
    train_s = time.perf_counter() - tic
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    for start in (0.0, delayed):
      tic = time.perf_counter()
      result = setup.task.evaluate(setup, os.path.join(workdir, "eval"), subject_start=start)
      row = dict(result, arm=arm, steps=setup.step, train_s=train_s,
                 eval_s=time.perf_counter() - tic,
                 steps_per_s=float(np.median([r["steps_per_sec"] for r in logged[1:]] or [0.0])),
                 final_mse=float(np.mean([r["mse"] for r in logged[-3:]])))
      rows.append(row)
      print(f"{arm} subject_start={start}: " + ", ".join(
          f"{k} {row[k]:.3f}" for k, _ in COLUMNS), flush=True)
    task = setup.task
    model, params, real_acc = task.digit_classifier(cache)
    maps = task.attention_maps(setup, examples, examples["image"], seed=first.seed,
                               subject_start=0.0)
    real_attention[arm] = fc_task.subject_scores(
        model, params, examples["image"], examples, task.source.digits("test"),
        maps)["attention_in_place"]
    print(f"{arm}: attention in place on the real canvases {real_attention[arm]:.3f}", flush=True)

  # Reference lines: the real compositions themselves, and same-class other digits.
  real = fc_task.subject_scores(model, params, examples["image"], examples,
                                task.source.digits("test"))

  m = first.model
  lines = [
      "FastComposer on multi-subject MNIST-5k (jaxgen.data.subjects: 16x32 canvases, 1-2 real "
      f"digits, two-subject share {first.data.two_subject_prob}); tiny random-init CLIP "
      f"(text {m.text_config.num_hidden_layers}x{m.text_config.hidden_size} frozen, vision "
      f"{m.vision_config.num_hidden_layers}x{m.vision_config.hidden_size} trained), U-Net "
      f"base {m.unet.base_channels} patch {m.unet.patch_size}; {first.training.steps} steps x "
      f"batch {first.training.batch_size}; {first.sample.method} {first.sample.num_steps} steps, "
      f"guidance {first.sample.guidance_scale}; {rows[0]['num_prompts']} test prompts "
      f"({rows[0]['num_subjects']} subjects); classifier {real_acc:.3f} on real test digits; "
      f"jax {jax.__version__} [{jax.default_backend()}].",
      "",
      "Command: `python -m benchmarks.fastcomposer_ablation "
      + " ".join(sys.argv[1:] if argv is None else argv) + "`",
      "",
      "| loc. loss weight | subject_start | " + " | ".join(c for _, c in COLUMNS)
      + " | attention in place, real canvases |",
      "|---|---|" + "---|" * (len(COLUMNS) + 1),
  ]
  for r in rows:
    lines.append(f"| {r['loc_loss_weight']:g} | {r['subject_start']:g} | "
                 + " | ".join(f"{r[k]:.3f}" for k, _ in COLUMNS)
                 + f" | {real_attention[r['arm']]:.3f} |")
  lines.append(f"| real compositions | - | {real['prompt_consistency']:.3f} | "
               f"{real['prompt_consistency_two_subjects']:.3f} | {real['identity']:.3f} | "
               f"{real['identity_two_subjects']:.3f} | - | - |")
  lines.append(f"| same class, other digit | - | - | - | "
               f"{real['identity_same_class_baseline']:.3f} | - | - | - |")
  lines.append("")
  lines.append("Training: " + ", ".join(
      f"{r['arm']} {r['steps_per_s']:.2f} steps/s median, final MSE {r['final_mse']:.4f}"
      for r in rows[::2]) + f" ({jax.devices()[0].device_kind}).")
  text = "\n".join(lines) + "\n"
  print("\n" + text)
  out = args.md or os.path.join(args.workdir, "results.md")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(dict(rows=rows, real=real, real_canvas_attention_in_place=real_attention,
                   classifier_test_accuracy=real_acc,
                   overrides=args.overrides), f, indent=1, default=str)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
