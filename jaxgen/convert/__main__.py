"""python -m jaxgen.convert --src=DIR --dst=DIR [--name=VARIANT]

Converts any model source the converters read into a jaxgen directory: jaxgen_model.json
plus an orbax checkpoint of the variables. The source's config.json picks the converter:

  `_class_name`  a diffusers model directory (config.json + diffusion_pytorch_model.safetensors,
                 e.g. a hub `mit-han-lab/dc-ae-*-diffusers` snapshot or a DiT `transformer/`
                 folder): `jaxgen.convert.from_diffusers`
  `model_type`   a transformers directory (config.json + model.safetensors, e.g.
                 openai/clip-vit-large-patch14): `jaxgen.convert.from_transformers`
  `model_name`   an original efficientvit DC-AE checkpoint (a DCAE_HF directory; also a bare
                 .safetensors or .pt file, with `--name` naming the variant)

A file holding FastComposer's released state dict (mit-han-lab/fastcomposer pytorch_model.bin,
read with torch.load(weights_only=True)) becomes a pipeline directory for
`jaxgen.pipelines.load_pipeline` instead (`jaxgen.convert.fastcomposer.write_pipeline`);
`--tokenizer=DIR` copies a CLIP tokenizer folder (SD-1.5's tokenizer/) into it.

Sharded weights (`*.safetensors.index.json` + shards) are read too. Load the result with
`jaxgen.convert.load_converted(DST)`; `python -m jaxgen.reconstruct --checkpoint=DST` and
`autoencoder.init_from=DST` read converted autoencoders. Bad input (a missing, empty or
truncated weights file, a pickle or HTML page under a .safetensors name, an invalid
config.json, tensors that do not fit the config) prints one `error:` line naming the file
and exits with 2.
"""

import sys
from typing import List

import jax
import numpy as np

from jaxgen.errors import ConfigError, cli

USAGE = ("usage: python -m jaxgen.convert --src=DIR --dst=DIR [--name=VARIANT] "
         "[--tokenizer=DIR]")


def parse_args(argv: List[str]):
  args = {"src": None, "dst": None, "name": None, "tokenizer": None}
  for arg in argv:
    if arg in ("-h", "--help"):
      print(__doc__)
      sys.exit(0)
    key, sep, value = arg.partition("=")
    if not (sep and key.startswith("--") and key[2:] in args):
      raise ConfigError(f"unrecognised argument {arg!r}. {USAGE}")
    args[key[2:]] = value
  if not args["src"] or not args["dst"]:
    raise ConfigError(f"--src and --dst are required. {USAGE}")
  return args


@cli
def main(argv: List[str]) -> int:
  args = parse_args(argv)
  from jaxgen.convert import fastcomposer  # pylint: disable=g-import-not-at-top
  if fastcomposer.handles(args["src"]):
    dst = fastcomposer.write_pipeline(args["src"], args["dst"], tokenizer=args["tokenizer"])
    note = "" if args["tokenizer"] else (" (no tokenizer/: copy SD-1.5's tokenizer folder there, "
                                         "or pass --tokenizer=DIR)")
    print(f"converted the FastComposer release {args['src']} to the pipeline directory "
          f"{dst}{note}", flush=True)
    return 0
  from jaxgen.convert.saved import convert_any, save_converted  # pylint: disable=g-import-not-at-top
  module, variables, kind = convert_any(args["src"], args["name"])
  dst = save_converted(args["dst"], module, variables, source=f"{kind}: {args['src']}")
  n = sum(np.size(x) for x in jax.tree.leaves(variables.get("params", {})))
  print(f"converted {kind} ({type(module).__name__}, {n:,} parameters) from {args['src']} "
        f"to {dst}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
