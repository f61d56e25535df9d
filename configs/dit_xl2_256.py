"""python -m jaxgen.main --config=configs/dit_xl2_256.py --workdir=workdirs/dit_xl2_256 --config.autoencoder.dir=DCAE_DIR

The DiT-XL/2 baseline (depth 28, width 1152, 16 heads, adaLN-Zero) on ImageNet 256 through
DC-AE f32c32-in-1.0 latents. DC-AE f32 turns 256 px into 8x8x32 latents, so the backbone runs
at patch size 1 (64 tokens) as in the DC-AE paper's "DiT-XL f32" rows, instead of DiT's patch 2
on 32x32x4 SD-VAE latents (256 tokens); learn_sigma is off (the objective trains eps only).
Data, autoencoder and recipe as configs/can_imagenet512.py (configs/common_latent.py).
Presets: `:smoke` (seconds on a CPU: MNIST-5k 32x32, tiny random DC-AE, a 2-block DiT).
"""

from configs import common_latent

MODEL = dict(name="dit", preset="DiT-XL/2", patch_size=1, learn_sigma=False)
SMOKE_MODEL = dict(name="dit", depth=2, hidden_size=32, num_heads=2, patch_size=1,
                   learn_sigma=False)

get_config = common_latent.config_getter(256, MODEL, SMOKE_MODEL)
