"""python -m jaxgen.main --config=configs/can_ablation.py:can --workdir=workdirs/can_ablation_can

CAN vs adaLN ablation (CAN paper, arXiv 2404.01143: condition-aware layers beat adaLN): one
small DiT on MNIST-5k (embedded real digits, pixel space, resized to 14x14, patch 2 -> 49
tokens), class-conditional with label dropout for guidance, trained for the same steps in three
arms:

  :can    CAN-DiT without adaLN: the condition (class + timestep embedding) enters only through
          the condition-aware patch embedding, attention output projections and FFN linears
  :adaln  plain DiT: adaLN-Zero modulation, static layers
  :both   adaLN-Zero and the condition-aware layers

Everything else (width, depth, data, schedule, optimizer, steps, seed, sampler) is identical.
Size: the adaLN arm must draw digits first. At 28x28 with patch 4 (16 pixels per token) it did
not: width 64, 800 steps: class accuracy 0.08; width 128, 2500 steps: 0.17 (speckled blobs).
At 14x14 with patch 2 (4 pixels per token, same 49 tokens and cost), width 128, 2500 steps:
0.79 (2026-11-23, 2-core CPU, 7.4 min). The CA layers use rank-16 generated cores, as can_dit
does by default, so the CAN arms cost about what DiT costs. Measured (BENCHMARKS.md): class
accuracy CAN 0.926, adaLN 0.792, both 0.954; feature FD 52.1, 48.8, 42.6.
`python -m benchmarks.can_ablation` trains and evaluates the three arms and reports the class
accuracy of the samples and the Frechet distance of their classifier features to real test
digits. Presets: `:can`, `:adaln`, `:both`; `:smoke` (the CAN arm in seconds; the tests run it).
"""

from configs import common

ARMS = {
    "can": dict(adaln=False, ca_patch_embed=True, ca_attn_out=True, ca_ffn=True),
    "adaln": dict(adaln=True, ca_patch_embed=False, ca_attn_out=False, ca_ffn=False),
    "both": dict(adaln=True, ca_patch_embed=True, ca_attn_out=True, ca_ffn=True),
}


def get_config(arg=None):
  arm = common.ablation_arm(arg, ARMS)
  c = common.base_config()
  c.data.update(dict(source="mnist5k", image_size=14, random_flip=False, num_classes=10))
  c.model = common.model_section(dict(
      name="can_dit", depth=4, hidden_size=128, num_heads=4, patch_size=2, mlp_ratio=4.0,
      num_classes=10, learn_sigma=False, ca_rank=16, **ARMS[arm]))
  c.diffusion.update(dict(schedule="cosine", num_steps=1000, prediction="eps",
                          label_dropout=0.1, min_snr_gamma=5.0))
  c.optimizer.update(dict(lr=1e-3, weight_decay=0.0, schedule="one_cycle", warmup_frac=0.1,
                          grad_clip=1.0, ema_decay=0.999))
  c.training.update(dict(batch_size=32, steps=2500, log_every=100, sample_every=0))
  c.checkpoint.update(dict(every=1250, keep=1))
  c.sample.update(dict(method="ddim", num_steps=25, guidance_scale=2.0, num_per_class=10,
                       batch_size=250))
  c.eval.update(dict(num_samples=500, classifier_epochs=8))
  if arg == "smoke":
    c = common.smoke(c)
  return c
