"""DiT: diffusion transformer with adaLN-Zero (Peebles & Xie 2023), and CAN-DiT.

Follows facebookresearch/DiT `models.py` top to bottom: embedders, the fixed 2D sin-cos position
table, the adaLN-Zero block, the final layer, the model, the S/B/L/XL presets. NHWC in and out:
`DiT(...).apply({"params": p}, x, t, y)` with x (B, H, W, C) latents, t (B,) timesteps, y (B,)
labels (y == num_classes is the null label of classifier-free guidance; label dropout is done
by the diffusion objective). Returns (B, H, W, 2C) with learn_sigma (noise, then variance).

CAN-DiT (CAN, arXiv 2404.01143) is the same model with condition-aware layers
(`jaxgen.nn.condition_aware`): `ca_patch_embed`, `ca_attn_out` (attention output projection)
and `ca_ffn` (both FFN linears) make those layers compute with W + W_c(c), c the class +
timestep embedding; `adaln=False` drops the adaLN modulation (then the norms have their own
scale and bias, and the condition enters through the condition-aware layers only). With every
`ca_*` off and `adaln=True` the model is exactly DiT.

Weight compatibility with diffusers' `DiTTransformer2DModel` (jaxgen.convert.dit): diffusers
embeds the timestep with frequency shift 1 (`time_freq_shift`) and uses `norm_eps` (1e-5 by
default) for the pre-FFN norm; DiT uses 0 and 1e-6. Both are fields here. diffusers also keeps a
timestep + class embedder in every block (`AdaLayerNormZero.emb`); in the hub checkpoints the
copies are equal and one shared embedder holds them, but a DiT fine-tuned in diffusers may have
them differ: `per_block_embedders=True` gives block i its own `t_embedder_{i}` / `y_embedder_{i}`
(block i's condition is its own embedding of t and y), and everything outside the blocks (the
final layer; the CA patch embedding) uses block 0's, as diffusers' final layer does.

Cross-attention (LDM / PixArt style): with `context_dim` set, every block gets a pre-LN
cross-attention to context tokens (`norm_cross`, `cross_attn`; not adaLN-modulated, output
projection zero-initialised so a new block starts as DiT) between self-attention and the MLP.
The context is a keyword argument, `apply(v, x, t, y, context=tokens)`, tokens (B, L, D) of any
width D. `label_conditioning` says what y does: "add" (default: the class embedding joins the
timestep embedding, DiT's path), "token" (the class embedding, width context_dim, is one context
token prepended to `context`; the condition c is then the timestep alone) or "none" (y ignored).
The same options apply to CAN-DiT (its condition-aware layers see c). Cross-attention maps are
recorded as in `jaxgen.nn.transformer` when the "attention_maps" collection is mutable.
"""

import functools
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.nn.attention import Attention
from jaxgen.nn.condition_aware import CAConv, CADense
from jaxgen.nn.embeddings import LabelEmbedder, TimestepEmbedder
from jaxgen.nn.transformer import cross_attend
from jaxgen.registry import MODELS

# DiT's initialisation: xavier-uniform linears with zero bias.
_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def get_2d_sincos_pos_embed(dim: int, grid_h: int, grid_w: int,
                            base_size: Optional[int] = None) -> np.ndarray:
  """Fixed (grid_h * grid_w, dim) table, tokens in row-major order (MAE / DiT / diffusers).

  The first dim/2 channels encode the column, the last dim/2 the row (DiT builds its grid with
  np.meshgrid(grid_w, grid_h), w first). `base_size` rescales positions to a grid of that size
  (diffusers' PatchEmbed, for inputs larger than the training resolution).
  """
  if dim % 4:
    raise ConfigError(f"DiT position embedding needs hidden_size divisible by 4; got {dim}")
  rows = np.arange(grid_h, dtype=np.float64) * ((base_size or grid_h) / grid_h)
  cols = np.arange(grid_w, dtype=np.float64) * ((base_size or grid_w) / grid_w)
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def encode(pos):  # (N,) -> (N, dim/2): [sin, cos]
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  col_grid, row_grid = np.meshgrid(cols, rows)  # each (grid_h, grid_w)
  emb = np.concatenate([encode(col_grid.reshape(-1)), encode(row_grid.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """Pre-norm attention + MLP; adaLN-Zero gives each branch a shift, scale and zero-init gate."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6  # Pre-FFN norm (diffusers' `norm_eps`); the pre-attention one is 1e-6.
  adaln: bool = True
  ca_attn_out: bool = False
  ca_ffn: bool = False
  ca_rank: Optional[int] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, context=None, spatial_shape=None):
    d = self.hidden_size
    # adaLN-Zero norms have no affine parameters; without adaLN they are ordinary LayerNorms.
    norm = lambda eps, name: nn.LayerNorm(epsilon=eps, use_bias=not self.adaln,
                                          use_scale=not self.adaln, name=name)
    if self.adaln:
      mod = nn.Dense(6 * d, kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype,
                     name="adaLN_modulation")(nn.silu(c))
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)

    h = norm(1e-6, "norm1")(x)
    if self.adaln:
      h = modulate(h, shift_msa, scale_msa)
    ca_dense = functools.partial(CADense, rank=self.ca_rank, kernel_init=_xavier)
    attn = Attention(d, self.num_heads, qkv_bias=True, dtype=self.dtype,
                     out_cls=ca_dense if self.ca_attn_out else None, name="attn")
    h = attn(h, cond=c) if self.ca_attn_out else attn(h)
    x = x + (gate_msa[:, None] * h if self.adaln else h)

    if context is not None:  # Cross-attention to the context tokens (see the module docstring).
      cross = Attention(d, self.num_heads, qkv_bias=True, dtype=self.dtype,
                        out_cls=functools.partial(nn.Dense, kernel_init=_zeros), name="cross_attn")
      h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm_cross")(x)
      x = x + cross_attend(self, cross, h, context, spatial_shape or (x.shape[1],))

    h = norm(self.norm_eps, "norm2")(x)
    if self.adaln:
      h = modulate(h, shift_mlp, scale_mlp)
    hidden = int(d * self.mlp_ratio)
    if self.ca_ffn:
      h = ca_dense(hidden, dtype=self.dtype, name="fc1")(h, c)
      h = ca_dense(d, dtype=self.dtype, name="fc2")(nn.gelu(h, approximate=True), c)
    else:
      h = nn.Dense(hidden, kernel_init=_xavier, dtype=self.dtype, name="fc1")(h)
      h = nn.Dense(d, kernel_init=_xavier, dtype=self.dtype, name="fc2")(
          nn.gelu(h, approximate=True))
    return x + (gate_mlp[:, None] * h if self.adaln else h)


class FinalLayer(nn.Module):
  """Norm (adaLN-modulated) -> zero-initialised linear to patch_size**2 * out_channels."""
  hidden_size: int
  out_features: int
  adaln: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    x = nn.LayerNorm(epsilon=1e-6, use_bias=not self.adaln, use_scale=not self.adaln,
                     name="norm_final")(x)
    if self.adaln:
      mod = nn.Dense(2 * self.hidden_size, kernel_init=_zeros, bias_init=_zeros,
                     dtype=self.dtype, name="adaLN_modulation")(nn.silu(c))
      shift, scale = jnp.split(mod, 2, -1)
      x = modulate(x, shift, scale)
    return nn.Dense(self.out_features, kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype,
                    name="linear")(x)


class DiT(nn.Module):
  """Diffusion transformer on NHWC latents: `apply(variables, x, t, y, train=False) -> NHWC`."""
  depth: int = 28
  hidden_size: int = 1152
  num_heads: int = 16
  patch_size: int = 2
  num_classes: int = 1000
  learn_sigma: bool = True
  out_channels: Optional[int] = None  # None: in_channels * (2 if learn_sigma else 1).
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  time_freq_shift: float = 0.0
  pos_embed_base_size: Optional[int] = None
  per_block_embedders: bool = False  # diffusers' per-block conditioning (see the docstring).
  # CAN-DiT options.
  adaln: bool = True
  ca_patch_embed: bool = False
  ca_attn_out: bool = False
  ca_ffn: bool = False
  ca_rank: Optional[int] = None  # W_c = U G(c) V of rank r in every CA layer; None: full W_c.
  # Cross-attention options (see the module docstring).
  context_dim: Optional[int] = None
  label_conditioning: str = "add"
  dtype: jnp.dtype = jnp.float32

  def _context(self, y, context):
    """The cross-attention tokens (B, L, D) or None; validates the label mode."""
    if self.label_conditioning not in ("add", "token", "none"):
      raise ConfigError(f"dit label_conditioning {self.label_conditioning!r} unknown; use "
                        "'add', 'token' or 'none'")
    if self.context_dim is None:
      if context is not None or self.label_conditioning == "token":
        raise ConfigError("this DiT has no cross-attention: set model.context_dim to use "
                          "context tokens or label_conditioning='token'")
      return None
    if self.label_conditioning == "token":
      token = LabelEmbedder(self.num_classes, self.context_dim, dtype=self.dtype,
                            name="y_embedder")(y)[:, None]
      context = token if context is None else jnp.concatenate(
          [token, context.astype(token.dtype)], axis=1)
    if context is None:
      raise ConfigError("this DiT cross-attends (context_dim is set): pass context=(B, L, "
                        f"{self.context_dim}) tokens or use label_conditioning='token'")
    if context.ndim != 3 or context.shape[-1] != self.context_dim:
      raise ConfigError(f"context must be (B, L, {self.context_dim}); got {context.shape}")
    return context

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, context=None):
    del train  # No dropout in DiT; label dropout is the objective's.
    b, h, w, cin = x.shape
    p, d = self.patch_size, self.hidden_size
    if h % p or w % p:
      raise ConfigError(f"DiT with patch_size {p} needs H and W divisible by {p}; got input "
                        f"{h}x{w}. Change the latent size or model.patch_size.")
    out_channels = self.out_channels or cin * (2 if self.learn_sigma else 1)

    # Condition: timestep + class embedding, (B, d); one per block with per_block_embedders.
    def condition(suffix: str = ""):
      c = TimestepEmbedder(d, freq_shift=self.time_freq_shift, dtype=self.dtype,
                           name="t_embedder" + suffix)(t)
      if self.label_conditioning == "add":
        c = c + LabelEmbedder(self.num_classes, d, dtype=self.dtype, name="y_embedder" + suffix)(y)
      return c

    if self.per_block_embedders:
      block_conds = [condition(f"_{i}") for i in range(self.depth)]
      c = block_conds[0] if block_conds else condition("_0")
    else:
      c = condition()
      block_conds = [c] * self.depth
    context = self._context(y, context)

    # Patchify: p x p conv, stride p, then tokens (B, N, d) + fixed position table.
    patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
    if self.ca_patch_embed:
      tokens = CAConv(d, (p, p), strides=p, kernel_init=patch_init, rank=self.ca_rank,
                      dtype=self.dtype, name="x_embedder")(x, c)
    else:
      tokens = nn.Conv(d, (p, p), strides=p, padding="VALID", kernel_init=patch_init,
                       dtype=self.dtype, name="x_embedder")(x)
    gh, gw = h // p, w // p
    pos = get_2d_sincos_pos_embed(d, gh, gw, self.pos_embed_base_size)
    tokens = tokens.reshape(b, gh * gw, d) + jnp.asarray(pos, tokens.dtype)

    for i in range(self.depth):
      tokens = DiTBlock(d, self.num_heads, self.mlp_ratio, self.norm_eps, self.adaln,
                        self.ca_attn_out, self.ca_ffn, self.ca_rank, self.dtype,
                        name=f"blocks_{i}")(tokens, block_conds[i], context, (gh, gw))
    out = FinalLayer(d, p * p * out_channels, self.adaln, self.dtype, name="final_layer")(
        tokens, c)

    # Unpatchify: each token holds a (p, p, out_channels) patch.
    out = out.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, out_channels).astype(jnp.float32)


# depth, hidden_size, num_heads (DiT paper Table 1).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (1, 2, 4, 8)


def dit_preset(name: str) -> dict:
  """"DiT-XL/2" (also "XL/2", "dit_xl_2") -> {depth, hidden_size, num_heads, patch_size}."""
  key = name.upper().replace("DIT-", "").replace("DIT_", "").replace("_", "/")
  size, _, patch = key.partition("/")
  if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    raise ConfigError(f"unknown DiT preset {name!r}; use DiT-{{{','.join(DIT_SIZES)}}}/"
                      f"{{{','.join(map(str, PATCH_SIZES))}}}, e.g. 'DiT-XL/2'.")
  depth, hidden, heads = DIT_SIZES[size]
  return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))


@MODELS.register("dit")
def dit(preset: Optional[str] = None, **kwargs) -> DiT:
  """DiT from a preset name ("DiT-XL/2") and/or explicit fields (explicit fields win)."""
  return DiT(**{**(dit_preset(preset) if preset else {}), **kwargs})


@MODELS.register("can_dit")
def can_dit(preset: Optional[str] = None, ca_patch_embed: bool = True, ca_attn_out: bool = True,
            ca_ffn: bool = True, adaln: bool = True, ca_rank: Optional[int] = 16,
            **kwargs) -> DiT:
  """CAN-DiT: DiT with condition-aware patch embedding, attention output and FFN (each a flag);
  `adaln=False` conditions through the condition-aware layers alone. Rank-16 generated weights
  by default (`jaxgen.nn.condition_aware`; full ones would need 1.5G parameters per DiT-XL
  layer; rank 16 costs +7% train-step time over DiT-S/2, rank 32 +21%: BENCHMARKS.md);
  `ca_rank=None` generates full weights, for small widths."""
  return dit(preset, ca_patch_embed=ca_patch_embed, ca_attn_out=ca_attn_out, ca_ffn=ca_ffn,
             adaln=adaln, ca_rank=ca_rank, **kwargs)
