"""python -m jaxgen.main --config=configs/unet_mnist_xattn.py --workdir=workdirs/unet_mnist_xattn

configs/unet_mnist.py with LDM's class conditioning: the label reaches the U-Net only as one
cross-attention token (SpatialTransformer blocks at the attention level and in the middle;
label_conditioning "token", like LDM's cin256 ImageNet model) instead of being added to the
timestep embedding. Same data, objective, sampler and evaluation as unet_mnist.
Presets: `:smoke` (seconds).
"""

from configs import unet_mnist


def get_config(arg=None):
  c = unet_mnist.get_config(arg)
  c.model.update(dict(context_dim=64, label_conditioning="token", transformer_depth=1))
  return c
