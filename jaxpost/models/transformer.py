"""The decoder forward pass as a pure function of (config, params, tokens).

    out = forward(config, params, tokens_BxT)
    out.logits            [B, T, V] float32
    out.final_hidden      [B, T, D] after the final norm (input of the LM head)
    out.hidden_states     [L + 1, B, T, D] embeddings and every layer's output
                          (only with `return_hidden_states=True`, else None)
    out.cache             the updated KVCache when one was given
    out.captured          {site: activations} for `capture=[...]` (see `jaxpost.models.sites`)

Layers run under one `lax.scan` over the stacked layer parameters, so compile time does not
grow with depth. Sliding-window and full-attention layers (Gemma 2/3) share the scanned body:
both masks and both RoPE tables are built once and each layer selects its own by a flag.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from jaxpost.models.attention import (KVCache, Prefix, attend, attention_mask, init_cache,
                                      prefix_cache)
from jaxpost.models.config import ModelConfig
from jaxpost.models.flash import blockwise_attend, choose_attention, cudnn_attend
from jaxpost.models.rope import apply_rope, rope_tables
from jaxpost.models.sites import Context, Sites
from jaxpost.sharding import constrain_batch
from jaxpost.models.weights import base_of, cast_tree, lookup, project


@struct.dataclass
class Output:
  logits: jax.Array | None
  final_hidden: jax.Array
  hidden_states: jax.Array | None = None
  cache: KVCache | None = None
  captured: dict | None = None


# `model.remat`: which activations a layer keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": None,  # keep only the layer's input
    "dots": jax.checkpoint_policies.dots_saveable,  # keep every matmul output
    # keep the projections' outputs, recompute attention's batched matmuls (MaxText "minimal")
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep q, k, v and the attention block's output only
    "qkv_attn_out": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out"),
}


def remat_policy_name(remat: bool | str | None) -> str:
  """The `REMAT_POLICIES` key for a `remat` argument (False/None: none, True: full)."""
  if remat is None or remat is False:
    return "none"
  if remat is True:
    return "full"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat: unknown policy {remat!r}; choose one of "
                     f"{', '.join(REMAT_POLICIES)}")
  return remat


def _lead(w, x):
  """`w` with leading unit axes to the rank of `x` (explicit broadcasting, no rank promotion)."""
  return w.reshape((1,) * (x.ndim - w.ndim) + w.shape)


def rms_norm(config: ModelConfig, x, weight):
  """RMSNorm in float32; Gemma scales by (1 + w) before casting, others cast then scale by w."""
  weight = _lead(weight, x)
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + config.rms_norm_eps)
  if config.norm_plus_one:
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
  return y.astype(x.dtype) * weight.astype(x.dtype)


def _activation(config: ModelConfig, x):
  if config.activation == "gelu_tanh":
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.silu(x)


def mlp(config: ModelConfig, p, x_BxTxD, hidden_hook=None):
  dt = x_BxTxD.dtype
  gate_BxTxF = project("btd,df->btf", x_BxTxD, p["gate"], dt)
  up_BxTxF = project("btd,df->btf", x_BxTxD, p["up"], dt)
  if config.mlp_bias:
    gate_BxTxF = gate_BxTxF + _lead(p["gate_bias"], gate_BxTxF)
    up_BxTxF = up_BxTxF + _lead(p["up_bias"], up_BxTxF)
  hidden_BxTxF = _activation(config, gate_BxTxF) * up_BxTxF
  if hidden_hook is not None:
    hidden_BxTxF = hidden_hook(hidden_BxTxF)
  out_BxTxD = project("btf,fd->btd", hidden_BxTxF, p["down"], dt)
  if config.mlp_bias:
    out_BxTxD = out_BxTxD + _lead(p["down_bias"], out_BxTxD)
  return out_BxTxD


def _project_qkv(config: ModelConfig, p, x_BxTxD):
  dt = x_BxTxD.dtype
  q = project("btd,dhk->bthk", x_BxTxD, p["q"], dt)
  k = project("btd,dhk->bthk", x_BxTxD, p["k"], dt)
  v = project("btd,dhk->bthk", x_BxTxD, p["v"], dt)
  if config.qkv_bias:
    q, k, v = q + _lead(p["q_bias"], q), k + _lead(p["k_bias"], k), v + _lead(p["v_bias"], v)
  if config.qk_norm:
    q, k = rms_norm(config, q, p["q_norm"]), rms_norm(config, k, p["k_norm"])
  return q, k, v


def _segment_positions(segment_ids_BxT):
  """Positions that restart at 0 at every segment change and skip padding (segment 0)."""
  valid = (segment_ids_BxT != 0).astype(jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], dtype=bool),
       segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  idx_T = jnp.arange(segment_ids_BxT.shape[1], dtype=jnp.int32)
  start_idx_BxT = jax.lax.cummax(jnp.where(starts, idx_T[None, :], 0), axis=1)
  counted_BxT = jnp.cumsum(valid, axis=1)
  before_start = jnp.take_along_axis(counted_BxT, start_idx_BxT, axis=1) - jnp.take_along_axis(
      valid, start_idx_BxT, axis=1)
  return jnp.maximum(counted_BxT - before_start - 1, 0)


def forward(
    config: ModelConfig,
    params: dict,
    tokens_BxT: jax.Array | None,
    *,
    embeddings: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    branch_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    compute_dtype: Any = None,
    return_hidden_states: bool = False,
    compute_logits: bool = True,
    remat: bool | str = False,
    attention: str = "auto",
    interventions: Any = None,
    capture: Any = None,
) -> Output:
  """Runs the decoder.

  Args:
    tokens_BxT: int token ids (None when `embeddings` are given).
    embeddings: [B, T, D] input embeddings used instead of looking up tokens (the rows of an
      embedding matrix: Gemma's sqrt(D) scaling still applies), e.g. a soft prompt.
    positions: RoPE positions [B, T]. Default: restart at 0 for every segment (packed rows)
      and skip padding; with a cache, continue from `cache.next_pos`.
    segment_ids: [B, T] ints; tokens attend only within their own segment; 0 is padding.
      Default: all ones (one sequence per row).
    branch_ids: [B, T] ints (no cache): within a segment a token sees branch 0 (the shared
      trunk) and its own branch only, e.g. prompt / chosen / rejected as 0 / 1 / 2 in one row
      (see `attention_mask`); give `positions` so each branch continues from the trunk.
    cache: a `KVCache` to read and extend (prefill or decode); the new tokens are written at
      `cache.index` onward.
    compute_dtype: dtype of activations and matmuls (parameters are cast to it); default the
      parameters' dtype. Norms, softmax, RoPE and logits are always float32.
    return_hidden_states: also return the embeddings and each layer's output.
    compute_logits: False skips the LM head (a chunked loss can call `lm_head` itself).
    remat: rematerialise each layer in the backward pass (saves activation memory): False or
      "none", True or "full", or a policy of `REMAT_POLICIES` naming what each layer keeps.
    attention: "dense" (the [T, S] probabilities), "blockwise" (`jaxpost.models.flash`:
      memory linear in T and S), "cudnn" (cuDNN's fused kernel on GPU, else blockwise) or
      "auto": dense below T * S = 1024 * 1024, blockwise above; dense with a KV cache given
      (decode) or the `attn_probs` site wanted. Real tokens get the same values either way.
    interventions: a sequence of interventions (see `jaxpost.models.sites`), each changing one
      site's activation at some layers, applied in order. None or empty: the same program as
      without them.
    capture: a sequence of site names or `Capture(site, layers)`: their activations (after
      any intervention there) come back in `out.captured`, stacked over the layers.

  Params may hold interventions under "edits" (a trained steering vector or low-rank edit,
  `jaxpost.whitebox.edit`): they apply before the `interventions` argument's.

  Params may hold a `Prefix` under "prefix" (prompt or prefix tuning, see `jaxpost.peft`):
  without a `cache`, every row then starts from the prefix's keys and values, and positions
  continue after it. (With a cache, the cache is expected to start with it already; see
  `start_cache`.)

  Raises:
    AssertionError: (chex, at trace time) tokens not [B, T], embeddings not [B, T, D], or
      positions / segment_ids not the tokens' [B, T].
  """
  c = config
  # Shape checks at trace time (they add nothing to the compiled program).
  if tokens_BxT is not None:
    chex.assert_rank(tokens_BxT, 2, custom_message="forward: tokens must be [B, T]")
    B, T = tokens_BxT.shape
  else:
    chex.assert_shape(embeddings, (None, None, c.hidden_size),
                      custom_message="forward: embeddings must be [B, T, hidden_size]")
    B, T = embeddings.shape[:2]
  for name, x in (("positions", positions), ("segment_ids", segment_ids),
                  ("branch_ids", branch_ids)):
    if x is not None:
      chex.assert_shape(x, (B, T), custom_message=f"forward: {name} must be [B, T] like the "
                        "tokens")
  dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else jnp.dtype(
      params["embed"].dtype)
  return_cache = cache is not None
  if branch_ids is not None and cache is not None:
    raise ValueError("forward: branch_ids are for training rows, not with a KV cache")
  if params.get("edits"):  # a trained edit (`jaxpost.whitebox.edit`) rides in the params
    interventions = (*params["edits"], *(interventions or ()))
  sites = Sites(interventions, capture, c.num_layers)
  if cache is None and params.get("prefix") is not None:
    prefix: Prefix = params["prefix"]
    cache = prefix_cache(prefix, B, prefix.length + T, dtype)
    if positions is not None:
      positions = positions + prefix.next_pos
  if segment_ids is None:
    segment_ids = jnp.ones((B, T), jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)
  valid_BxT = segment_ids != 0

  if cache is None:
    if positions is None:
      positions = _segment_positions(segment_ids)
    q_slots_T = jnp.arange(T, dtype=jnp.int32)
    k_slots_S, k_seg_BxS = q_slots_T, segment_ids
  else:
    if positions is None:
      positions = cache.next_pos[:, None] + jnp.cumsum(valid_BxT, axis=1, dtype=jnp.int32) - 1
      positions = jnp.maximum(positions, 0)
    q_slots_T = cache.index + jnp.arange(T, dtype=jnp.int32)
    k_slots_S = jnp.arange(cache.max_len, dtype=jnp.int32)
    k_seg_BxS = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
  positions = positions.astype(jnp.int32)

  if branch_ids is not None and cache is None and params.get("prefix") is None:
    branches = (branch_ids.astype(jnp.int32), branch_ids.astype(jnp.int32))
  elif branch_ids is not None:
    raise ValueError("forward: branch_ids do not combine with a prompt/prefix-tuning prefix")
  else:
    branches = ()
  S = k_slots_S.shape[0]
  kind = choose_attention(attention, T=T, S=S, cached=return_cache, config=c, dtype=dtype,
                          wants_probs=sites.wants("attn_probs"), prefixed=cache is not None)
  if kind == "dense":  # [B, T, S] each: built only for dense attention
    full_mask = attention_mask(q_slots_T, k_slots_S, segment_ids, k_seg_BxS, None, *branches)
    sliding_mask = attention_mask(q_slots_T, k_slots_S, segment_ids, k_seg_BxS,
                                  c.sliding_window, *branches)
  full_rope = rope_tables(c.rope, c.head_dim, positions)
  sliding_rope = rope_tables(c.rope_for_sliding, c.head_dim, positions)
  uniform = len(set(c.layer_types)) == 1
  is_sliding_L = jnp.asarray([t == "sliding" for t in c.layer_types])

  def select(flag, when_sliding, when_full):
    if uniform:
      return when_sliding if c.layer_types[0] == "sliding" else when_full
    return jax.tree.map(lambda s, f: jnp.where(flag, s, f), when_sliding, when_full)

  def attention_of(flag, q, k_BxKxSxDh, v_BxKxSxDh, probs_hook):
    if kind == "dense":
      mask = select(flag, sliding_mask, full_mask)
      return attend(c, q, k_BxKxSxDh, v_BxKxSxDh, mask, probs_hook=probs_hook)
    window = None  # a traced scalar when sliding and full layers share the scan
    if "sliding" in c.layer_types:
      window = c.sliding_window if uniform else jnp.where(flag, c.sliding_window, S + T + 1)
    if kind == "cudnn":
      return cudnn_attend(c, q, k_BxKxSxDh, v_BxKxSxDh, q_slots_T, segment_ids, window,
                          *branches)
    return blockwise_attend(c, q, k_BxKxSxDh, v_BxKxSxDh, q_slots_T, k_slots_S, segment_ids,
                            k_seg_BxS, window, *branches)

  policy = remat_policy_name(remat)
  named = policy == "qkv_attn_out"
  sites.context = Context(positions=positions, segment_ids=segment_ids, slots=q_slots_T)

  def layer(carry, xs):
    x_BxTxD, k_all, v_all, buffers = carry
    lp, flag, i = xs
    record = {} if sites.captures else None
    if sites.active:
      def hook(site, a):
        return sites.apply(site, a, i, record)
    else:
      def hook(site, a):
        return a
    lp = cast_tree(lp, dtype)
    cos, sin = select(flag, sliding_rope, full_rope)
    x_BxTxD = hook("resid_pre", x_BxTxD)
    h = rms_norm(c, x_BxTxD, lp["attn_pre_norm"])
    q, k, v = _project_qkv(c, lp["attn"], h)
    q, k, v = hook("q", q), hook("k", k), hook("v", v)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if named:
      q, k, v = (checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v"))
    k_BxKxSxDh, v_BxKxSxDh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if isinstance(k_all, tuple):
      # One buffer per layer (unstacked layers, `i` static): written in place and read as is,
      # with no per-layer slice copied out of a stack.
      at = (0, 0, cache.index, 0)
      k_i = jax.lax.dynamic_update_slice(k_all[i], k_BxKxSxDh.astype(k_all[i].dtype), at)
      v_i = jax.lax.dynamic_update_slice(v_all[i], v_BxKxSxDh.astype(v_all[i].dtype), at)
      k_all, v_all = k_all[:i] + (k_i,) + k_all[i + 1:], v_all[:i] + (v_i,) + v_all[i + 1:]
      k_BxKxSxDh, v_BxKxSxDh = k_i.astype(dtype), v_i.astype(dtype)
    elif k_all is not None:
      # The whole cache rides in the scan carry and only the new slots are written, in place.
      at = (i, 0, 0, cache.index, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k_BxKxSxDh.astype(k_all.dtype)[None], at)
      v_all = jax.lax.dynamic_update_slice(v_all, v_BxKxSxDh.astype(v_all.dtype)[None], at)
      k_BxKxSxDh = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False).astype(dtype)
      v_BxKxSxDh = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False).astype(dtype)
    probs_hook = (lambda p: hook("attn_probs", p)) if sites.wants("attn_probs") else None
    attn_BxTxHxDh = attention_of(flag, q, k_BxKxSxDh, v_BxKxSxDh, probs_hook)
    attn_BxTxHxDh = hook("head_out", attn_BxTxHxDh)
    out = project("bthk,hkd->btd", attn_BxTxHxDh, lp["attn"]["o"], dtype)
    if c.o_bias:
      out = out + _lead(lp["attn"]["o_bias"], out)
    if c.sandwich_norm:
      out = rms_norm(c, out, lp["attn_post_norm"])
    out = hook("attn_out", out)
    if named:
      out = checkpoint_name(out, "attn_out")
    x_BxTxD = hook("resid_mid", x_BxTxD + out)
    h = rms_norm(c, x_BxTxD, lp["mlp_pre_norm"])
    hidden_hook = (lambda a: hook("mlp_hidden", a)) if sites.wants("mlp_hidden") else None
    out = mlp(c, lp["mlp"], h, hidden_hook)
    if c.sandwich_norm:
      out = rms_norm(c, out, lp["mlp_post_norm"])
    out = hook("mlp_out", out)
    x_BxTxD = hook("resid_post", x_BxTxD + out)
    if record is not None:
      buffers = sites.write_buffers(buffers, record, i)
      ys = (x_BxTxD if return_hidden_states else None, sites.all_layer_outputs(record))
    else:
      ys = (x_BxTxD if return_hidden_states else None, {})
    return (x_BxTxD, k_all, v_all, buffers), ys

  if policy != "none":
    layer = jax.checkpoint(layer, prevent_cse=False, policy=REMAT_POLICIES[policy])

  if embeddings is not None:
    x_BxTxD = embeddings.astype(dtype)
  else:
    x_BxTxD = lookup(params["embed"], tokens_BxT, dtype)
  if c.scale_embeddings:
    x_BxTxD = x_BxTxD * jnp.asarray(c.embed_scale, dtype)
  x_BxTxD = constrain_batch(x_BxTxD)  # split by batch under a mesh, not like the table
  S = k_slots_S.shape[0]
  buffers = sites.empty_buffers(_site_shapes(c, B, T, S, dtype)) if sites.captures else {}
  carry = (x_BxTxD, cache.k if cache is not None else None,
           cache.v if cache is not None else None, buffers)
  if isinstance(params["layers"], (list, tuple)):  # unstacked (see `unstack_layers`)
    outs = []
    for i, lp in enumerate(params["layers"]):
      carry, out_i = layer(carry, (lp, is_sliding_L[i], i))
      outs.append(out_i)
    (y_BxTxD, new_k, new_v, buffers) = carry
    layer_outs = jnp.stack([o[0] for o in outs]) if return_hidden_states else None
    every_layer = {s: jnp.stack([o[1][s] for o in outs]) for s in outs[0][1]}
  else:
    xs = (params["layers"], is_sliding_L, jnp.arange(c.num_layers, dtype=jnp.int32))
    (y_BxTxD, new_k, new_v, buffers), (layer_outs, every_layer) = jax.lax.scan(layer, carry, xs)
  captured = {**every_layer, **buffers} if sites.captures else None

  hidden_states = None
  if return_hidden_states:
    hidden_states = jnp.concatenate([x_BxTxD[None], layer_outs], axis=0)
  final_BxTxD = rms_norm(c, y_BxTxD, params["final_norm"].astype(dtype))
  logits = lm_head(c, params, final_BxTxD) if compute_logits else None

  new_cache = None
  if return_cache:
    new_pos = jnp.where(valid_BxT, positions + 1, 0).max(axis=1)
    new_cache = KVCache(k=new_k, v=new_v, segment_ids=k_seg_BxS,
                        next_pos=jnp.maximum(cache.next_pos, new_pos), index=cache.index + T)
  return Output(logits=logits, final_hidden=final_BxTxD, hidden_states=hidden_states,
                cache=new_cache, captured=captured)


def _site_shapes(c: ModelConfig, B: int, T: int, S: int, dtype) -> dict:
  """Each site's activation shape in one layer (for the capture buffers)."""
  H, K, Dh, D = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
  shapes = dict(resid_pre=(B, T, D), q=(B, T, H, Dh), k=(B, T, K, Dh), v=(B, T, K, Dh),
                attn_probs=(B, H, T, S), head_out=(B, T, H, Dh), attn_out=(B, T, D),
                resid_mid=(B, T, D), mlp_hidden=(B, T, c.intermediate_size),
                mlp_out=(B, T, D), resid_post=(B, T, D))
  return {k: jax.ShapeDtypeStruct(v, dtype) for k, v in shapes.items()}


def unstack_layers(params: dict) -> dict:
  """`params` with the stacked layer weights split into a tuple of per-layer trees.

  `forward` accepts both. Stacked layers run under one `lax.scan` (compile time independent of
  depth), which on XLA:CPU copies each layer's weights out of the stack on every call: nothing
  next to a training step's matmuls, but at decode time, where a step's matmuls are as small
  as the weights themselves, it is about a fifth of the step. Generation therefore unstacks
  once, before its decode loop.
  """
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return dict(params, layers=tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)))


def lm_head_weight(config: ModelConfig, params: dict) -> Any:
  """The [D, V] output projection: the transposed base embedding when tied (an adapter on the
  embedding does not reach the tied head, as in PEFT), else `lm_head` (array or weight object)."""
  return base_of(params["embed"]).T if config.tie_embeddings else params["lm_head"]


def lm_head(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array) -> jax.Array:
  """Logits [B, T, V] in float32 from final hidden states, with Gemma 2's final soft-cap."""
  logits = project("btd,dv->btv", hidden_BxTxD, lm_head_weight(config, params),
                   hidden_BxTxD.dtype, preferred_element_type=jnp.float32)
  if config.final_logit_softcap:
    cap = config.final_logit_softcap
    logits = jnp.tanh(logits / cap) * cap
  return logits


def start_cache(config: ModelConfig, params: dict, batch: int, length: int,
                dtype=jnp.float32) -> KVCache:
  """An empty cache with room for `length` tokens per row, after the params' `Prefix` (prompt
  or prefix tuning) when they have one."""
  prefix = params.get("prefix")
  if prefix is None:
    return init_cache(config, batch, length, dtype)
  return prefix_cache(prefix, batch, prefix.length + length, dtype)
