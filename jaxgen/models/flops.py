"""Parameter and compute counts of the diffusion backbones, without allocating anything.

`count_macs` walks the jaxpr and adds up the multiply-accumulates of every `dot_general` and
`conv_general_dilated` (matmuls, attention, convolutions; elementwise work is ignored). That is
the convention of the DiT / CAN / U-ViT papers' "GFLOPs" (fvcore counts one fused multiply-add
as one flop): DiT-XL/2 at 256 is 118.6 "GFLOPs" = 118.6 G multiply-adds = about 237 G
floating-point operations. `backbone_costs` reports both (`gmacs` is the papers' figure).
`xla_flops` is XLA's own count of the compiled program (2 per multiply-add, plus elementwise).
Pallas kernels are not looked into: count with `impl="xla"` layers.
"""

import functools
import math
from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature_dim]
  return 0


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    if eqn.primitive.name == "pallas_call":
      continue
    if eqn.primitive.name == "cond":
      total += max(_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params["branches"]))
      continue
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        total += repeat * _jaxpr_macs(sub)
  return total


def count_macs(fn: Callable, *args, **kwargs) -> int:
  """Multiply-accumulates of `fn(*args)`; args may be arrays or jax.ShapeDtypeStruct."""
  return _jaxpr_macs(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr)


def count_params(tree) -> int:
  """Number of scalars in a (possibly abstract) pytree of arrays."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def xla_flops(fn: Callable, *args) -> float:
  """XLA's flop count of the compiled `fn(*args)` (compiles: slow for large models on CPU)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, Sequence):
    analysis = analysis[0]
  return float(analysis["flops"])


def backbone_costs(model, input_shape: Sequence[int], batch_size: int = 1) -> Dict[str, Any]:
  """Params and per-sample compute of a diffusion backbone `apply(v, x, t, y)` on input (H, W, C).

  Returns {"params": int, "macs": int, "gmacs": float (the papers' "GFLOPs"),
  "gflops": float (2 * gmacs)}, from abstract shapes only.
  """
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
  macs = count_macs(lambda v, x, t, y: model.apply(v, x, t, y), variables, x, t, y) // batch_size
  return dict(params=count_params(variables.get("params", variables)), macs=macs,
              gmacs=macs / 1e9, gflops=2 * macs / 1e9)
