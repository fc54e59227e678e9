"""Mixed precision and rematerialisation: the names configs use, and what they become.

Every mmjax module takes `dtype` (the computation dtype: the dtype of activations and of
the matrix products) and `param_dtype` (the parameters' dtype), both float32 by default,
as flax.linen's layers do. What stays float32 whatever `dtype` says: the attention
softmax (`mmjax.nn.attention`), LayerNorm and GroupNorm statistics (flax computes them
in float32), and every model's output that feeds a loss or an evaluator (logits,
embeddings, predicted noise, reconstructions), so losses and contrastive logits are
float32 too.

Rematerialisation (`remat`) trades compute for memory: a block's activations are not
kept for the backward pass but recomputed from its input. "none" keeps them, "full"
recomputes everything, and a name in REMAT_POLICIES keeps what that
`jax.checkpoint_policies` policy saves (e.g. "dots_with_no_batch_dims_saveable": the
matrix products' outputs). The parameters and the gradients are the same either way.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

# Config names -> dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# jax.checkpoint_policies members that are policies themselves (not policy factories).
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable",
                  "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots_with_no_batch_dims")
REMAT_CHOICES = ("none", "full") + REMAT_POLICIES


def as_dtype(name: str, field: str = "dtype"):
  """"bfloat16" -> jnp.bfloat16; a ValueError naming `field` for anything else."""
  if name not in DTYPES:
    raise ValueError(f"{field}={name!r}: use one of {', '.join(map(repr, DTYPES))}.")
  return DTYPES[name]


def check_remat(remat: str, owner: str = "remat") -> str:
  """Returns `remat` if it is one of REMAT_CHOICES, else raises a ValueError saying so."""
  if remat not in REMAT_CHOICES:
    raise ValueError(f"{owner}={remat!r}: use 'none', 'full' or a jax.checkpoint_policies "
                     f"policy: {', '.join(REMAT_POLICIES)}.")
  return remat


def remat(module_cls, policy: str, static_argnums: tuple[int, ...] = (),
          prevent_cse: bool = True):
  """`module_cls`, or `nn.remat(module_cls)` with the named policy (see module docstring).

  `static_argnums` count `self` as 0 (flax's convention): the call's Python bools, such
  as `deterministic`. The parameter tree is the same as without remat.
  """
  if check_remat(policy) == "none":
    return module_cls
  jax_policy = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
  return nn.remat(module_cls, policy=jax_policy, static_argnums=static_argnums,
                  prevent_cse=prevent_cse)


def to_float32(tree):
  """Every floating-point array of `tree` as float32 (what feeds a loss)."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
