"""python -m jaxgen.main --config=configs/cat_l0_512.py --workdir=workdirs/cat_l0_512 --config.autoencoder.dir=DCAE_DIR

CaT-L0 (the smaller CaT, derived from EfficientViT-L0; configs/can_imagenet512.py trains L1) on
ImageNet 512 through DC-AE f32c32-in-1.0 latents (16x16x32, patch 1), class-conditional with
classifier-free guidance; data, autoencoder and recipe as configs/can_imagenet512.py.
Presets: `:smoke` (seconds on a CPU: MNIST-5k 32x32, tiny random DC-AE, 2-level CaT; the tests run it).
"""

from configs import common_latent

MODEL = dict(name="cat", size="L0", patch_size=1, learn_sigma=False)

get_config = common_latent.config_getter(512, MODEL)
