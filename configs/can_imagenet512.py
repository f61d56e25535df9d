"""python -m jaxgen.main --config=configs/can_imagenet512.py --workdir=workdirs/can_imagenet512 --config.autoencoder.dir=DCAE_DIR

The main job: CaT (CAN's condition-aware EfficientViT backbone, size L1) on ImageNet 512,
class-conditional, on DC-AE f32c32-in-1.0 latents (512 px -> 16x16x32, scaled by 0.3189),
patch size 1, classifier-free guidance. Needs tfds imagenet2012 prepared in the array_record
format (the DataError says how) and a converted DC-AE (`python -m jaxgen.convert
--src=<mit-han-lab/dc-ae-f32c32-in-1.0-diffusers snapshot> --dst=DCAE_DIR`). Optionally
encode the dataset once (`python -m jaxgen.data.latent_cache --config=configs/can_imagenet512.py
--config.autoencoder.dir=DCAE_DIR --config.data.latent_cache=LATENTS`) and train with
`--config.data.latent_cache=LATENTS`. See configs/common_latent.py for the training recipe.
Presets: `:smoke` (seconds on a CPU: MNIST-5k 32x32, tiny random DC-AE, 2-level CaT; the tests run it).
"""

from configs import common_latent

MODEL = dict(name="cat", size="L1", patch_size=1, learn_sigma=False)

get_config = common_latent.config_getter(512, MODEL)
