"""Pallas splash attention (the TPU flash-attention kernel) for ``implementation="splash"``.

Splash attention takes no additive bias. Its masks are a static block mask (full or
causal) plus per-example segment ids: a query attends a key only when their ids are
equal. A key-padding mask maps onto that directly: every query gets id 0, real keys 0,
masked keys 1. Masked keys then take exactly zero weight, as ``MASK_BIAS`` gives them on
the XLA path (exp(-10000) is 0 in float32). The results differ only in rows with no
visible key, whose outputs every reference model masks downstream; splash keeps them finite.

The kernel tiles sequences in blocks of 128 (the TPU lane width), so both lengths are
padded to a multiple of 128: extra keys are masked, extra query rows are sliced off.
Padding at the end keeps a causal mask right.

Off TPU the kernel runs in Pallas' interpret mode, which is slow but exact: that is how the
tests check it on CPU. On GPUs use ``"cudnn"``. Under a multi-device mesh set with
``jax.set_mesh`` the call runs inside ``shard_map`` over the mesh's batch axes (and the
heads over ``tensor``), because GSPMD cannot partition a Mosaic kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from unclip_jax.parallel import BATCH_AXES

LANE = 128
_HEAD_AXIS = "tensor"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, LANE) if length % b == 0)


def _kernel(q_len: int, kv_len: int, heads: int, causal: bool, interpret: bool):
    """A splash kernel for (heads, q_len, D) queries and (heads, kv_len, D) keys/values.

    Built afresh in each trace (its mask tables become arrays of that trace); the costly
    part, processing the block mask in NumPy, is cached by Pallas per mask and block size.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    one_head = mask_lib.CausalMask((q_len, kv_len)) if causal else mask_lib.FullMask((q_len, kv_len))
    mask = mask_lib.MultiHeadMask([one_head] * heads)
    bq, bkv = _block(q_len), _block(kv_len)
    sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                  block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                  block_q_dq=bq, block_kv_dq=bkv)
    return kernel_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                      interpret=interpret)


def _mesh_specs(batch: int, heads: int):
    """(mesh, batch/heads PartitionSpec) for ``shard_map`` under the context mesh, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    head_axis = _HEAD_AXIS if _HEAD_AXIS in mesh.shape and heads % mesh.shape[_HEAD_AXIS] == 0 else None
    # The batch splits over all batch axes, else over 'data' alone; a batch that neither
    # divides (e.g. 1 on 8 devices) runs replicated: correct, if not parallel.
    all_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    batch_spec = None
    for axes in (all_axes, all_axes[:1]):
        if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0:
            batch_spec = axes
            break
    return mesh, jax.sharding.PartitionSpec(batch_spec, head_axis)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     key_mask: jax.Array | None = None, is_causal: bool = False,
                     scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, masked) v with the splash kernel.

    Args:
      q: (B, Lq, H, D) queries.
      k, v: (B, Lk, H, D) keys and values.
      key_mask: (B, Lk) bool, True = attend; None attends every key.
      is_causal: mask keys after each query (needs Lq == Lk).
      scale: logits scale; 1/sqrt(D) by default.
    Returns:
      (B, Lq, H, D) in the dtype of ``q``.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        raise ValueError("splash attention is a TPU kernel; on GPUs use attention 'cudnn' or 'xla'")
    b, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if is_causal and q_len != kv_len:
        raise ValueError(f"causal attention needs equal query and key lengths, got {q_len} and {kv_len}")
    if key_mask is not None and key_mask.shape != (b, kv_len):
        raise ValueError(f"key_mask {key_mask.shape} must be (B, Lk) = {(b, kv_len)}")
    dtype = q.dtype
    # The kernel takes no scale: q is scaled first (in float32, then rounded back to its
    # dtype: exact for power-of-two scales such as 1/8 at head size 64).
    q = (q.astype(jnp.float32) * (head_dim ** -0.5 if scale is None else scale)).astype(dtype)
    key_mask = jnp.ones((b, kv_len), bool) if key_mask is None else key_mask.astype(bool)

    q_pad, kv_pad = _round_up(q_len, LANE) - q_len, _round_up(kv_len, LANE) - kv_len
    heads_major = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q, k, v = heads_major(q, q_pad), heads_major(k, kv_pad), heads_major(v, kv_pad)
    key_mask = jnp.pad(key_mask, ((0, 0), (0, kv_pad)))
    q_ids = jnp.zeros((b, q_len + q_pad), jnp.int32)
    kv_ids = jnp.where(key_mask, 0, 1).astype(jnp.int32)
    interpret = backend != "tpu"

    def attend(q, k, v, q_ids, kv_ids):
        from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
        kernel = _kernel(q.shape[2], k.shape[2], q.shape[1], bool(is_causal), interpret)
        return jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=SegmentIds(qi, ki)))(
            q, k, v, q_ids, kv_ids)

    placement = _mesh_specs(b, heads)
    if placement is not None:
        mesh, qkv_spec = placement
        ids_spec = jax.sharding.PartitionSpec(qkv_spec[0])
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,) * 2,
                               out_specs=qkv_spec, check_vma=False)
    out = attend(q, k, v, q_ids, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :q_len].astype(dtype)
