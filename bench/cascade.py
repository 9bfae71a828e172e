"""Our text → image cascade as ONE jitted program, chained from the stage samplers.

CLIP text tower → prior (``sample_prior``) → decoder (``sample_decoder``) → super-res
(``sample_upsampler``, first model for n−1 steps, last model for the final step), as
diffusers' UnCLIPPipeline does it (bench.arch.SAMPLING: 25/25/7 steps, guidance 4/8, one
prior candidate, the empty prompt "" as the null text of both guided stages). Tokenising
runs on the host (as in diffusers); everything else is one ``jax.jit``, so the whole
cascade compiles once per batch size and runs without Python between steps.

When ``unclip_jax.pipeline`` exists (the lead's cascade API) this module stays the
benchmark's own wiring, so that the benchmark measures exactly the stage samplers.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bench.arch import PROMPT, SAMPLING, write_char_vocab


def cascade_stages(configs: Mapping[str, Any], *, sampling: Mapping[str, Any] = SAMPLING) -> dict[str, Callable]:
    """The cascade's four stages as plain functions (not jitted), in order:

    * ``clip_text(params, ids, null_ids) -> (text_embed, text_hidden, null_embed, null_hidden)``
    * ``prior(params, text_embed, text_hidden, mask, null_embed, null_hidden, null_mask, key) -> z_i``
    * ``decoder(params, z_i, text_embed, text_hidden, mask, null_embed, null_hidden, null_mask, key) -> low``
    * ``super_res(params, low, key) -> images`` in [0, 1]

    ``params`` is the whole stack's dict; :func:`make_cascade` chains them into one program,
    :func:`stage_compile_times` compiles each alone.
    """
    from unclip_jax.models.clip import CLIPModel
    from unclip_jax.stages.decoder import sample_decoder
    from unclip_jax.stages.prior import sample_prior
    from unclip_jax.stages.upsampler import sample_upsampler

    clip = CLIPModel(configs["clip"])
    prior_cfg, dec_cfg, sr_cfg = configs["prior"], configs["decoder"], configs["super_res"]
    sr_size = int(sr_cfg["sample_size"])

    def clip_text(params, ids, null_ids):
        encode = lambda x: clip.apply({"params": params["clip"]}, x, None, method="encode_text")
        return (*encode(ids), *encode(null_ids))

    def prior(params, text_embed, text_hidden, mask, null_embed, null_hidden, null_mask, key):
        return sample_prior(params["prior"], params["prior_stats"], prior_cfg, text_embed, text_hidden, mask,
                            null_embed, null_hidden, null_mask, key, steps=sampling["prior_steps"],
                            guidance_scale=sampling["prior_guidance"], clip_range=sampling["prior_clip_range"],
                            best_of_n=1)

    def decoder(params, z_i, text_embed, text_hidden, mask, null_embed, null_hidden, null_mask, key):
        return sample_decoder(params["decoder"], dec_cfg, z_i, text_embed, text_hidden, mask, key,
                              steps=sampling["decoder_steps"], guidance_scale=sampling["decoder_guidance"],
                              null_text_embed=null_embed, null_text_hidden=null_hidden, null_text_mask=null_mask)

    def super_res(params, low, key):
        high = sample_upsampler(params["sr_first"], params["sr_last"], sr_cfg, low, key,
                                steps=sampling["super_res_steps"], out_size=sr_size)
        return jnp.clip(high * 0.5 + 0.5, 0.0, 1.0).astype(jnp.float32)

    return {"clip_text": clip_text, "prior": prior, "decoder": decoder, "super_res": super_res}


def stage_keys(seed) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The prior's, decoder's and super-res stage's PRNG keys for a cascade call's ``seed``."""
    k_prior, k_dec, k_sr = jax.random.split(jax.random.key(seed), 3)
    return k_prior, k_dec, k_sr


def make_cascade(configs: Mapping[str, Any], *, sampling: Mapping[str, Any] = SAMPLING) -> Callable:
    """``cascade(params, ids, mask, null_ids, null_mask, seed) -> images (B, S, S, 3)``, jitted.

    ``ids``/``mask`` (B, 77) int32/bool: the prompts' tokens and real-token mask;
    ``null_ids``/``null_mask`` (1, 77): the "" prompt's; ``seed`` an int32 scalar (the PRNG
    key is made inside, so the program has only plain array arguments and can be exported
    with ``jax.export``). Images are float32 in [0, 1], as ``UnCLIPPipeline(output_type="np")``.
    """
    stage = cascade_stages(configs, sampling=sampling)

    def cascade(params, ids, mask, null_ids, null_mask, seed):
        k_prior, k_dec, k_sr = stage_keys(seed)
        # Named scopes put the stage into every op's metadata (bench/profile.py splits a
        # device trace by stage with them); they do not change the computation.
        with jax.named_scope("clip_text"):
            text_embed, text_hidden, null_embed, null_hidden = stage["clip_text"](params, ids, null_ids)
        with jax.named_scope("prior"):
            z_i = stage["prior"](params, text_embed, text_hidden, mask, null_embed, null_hidden, null_mask, k_prior)
        with jax.named_scope("decoder"):
            low = stage["decoder"](params, z_i, text_embed, text_hidden, mask, null_embed, null_hidden, null_mask,
                                   k_dec)
        with jax.named_scope("super_res"):
            return stage["super_res"](params, low, k_sr)

    return jax.jit(cascade)


def stage_compile_times(configs: Mapping[str, Any], cascade_args: tuple) -> dict[str, dict[str, float]]:
    """Seconds of tracing+lowering and of compiling each stage as its own program, given the
    cascade's arguments (arrays or ``ShapeDtypeStruct``); each stage's inputs are the
    shapes the previous stage returns. With no persistent cache this splits a cold compile
    of the whole cascade by stage (one program per stage compiles a little more in all:
    nothing is fused across stages)."""
    stage = cascade_stages(configs)
    params, ids, mask, null_ids, null_mask, seed = cascade_args
    key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype)
    shape = lambda f, *a: jax.eval_shape(f, *a)
    text = shape(stage["clip_text"], params, ids, null_ids)
    embed, hidden, null_embed, null_hidden = text
    z_i = shape(stage["prior"], params, embed, hidden, mask, null_embed, null_hidden, null_mask, key)
    low = shape(stage["decoder"], params, z_i, embed, hidden, mask, null_embed, null_hidden, null_mask, key)
    inputs = {"clip_text": (params, ids, null_ids),
              "prior": (params, embed, hidden, mask, null_embed, null_hidden, null_mask, key),
              "decoder": (params, z_i, embed, hidden, mask, null_embed, null_hidden, null_mask, key),
              "super_res": (params, low, key)}
    times = {}
    for name, args in inputs.items():
        t0 = time.perf_counter()
        lowered = jax.jit(stage[name]).lower(*args)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        times[name] = {"trace_lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}
    return times


class Prompts:
    """Host-side tokenising of the benchmark prompt (the same character vocabulary as the
    diffusers side, through our tokenizer), cached per batch size."""

    def __init__(self, tokenizer_dir: str):
        from unclip_jax.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(tokenizer_dir)
        null = self.tokenizer([""])
        self.null = (null.input_ids, null.attention_mask)

    def __call__(self, batch: int, prompt: str = PROMPT):
        t = self.tokenizer([prompt] * batch)
        return t.input_ids, t.attention_mask


def tokenizer_files(directory: str) -> str:
    """Writes the anchor's character-level CLIP vocabulary (no torch needed) into ``directory``."""
    write_char_vocab(directory)
    return directory


class Runner:
    """One compiled cascade per batch size; ``run(b)`` times a full text → image call
    (tokenising, the device program, and the copy of the images to the host, as
    ``UnCLIPPipeline(output_type="np")``)."""

    def __init__(self, configs, params, prompts: Prompts, *, seed: int = 0):
        self.params, self.prompts, self.configs = params, prompts, configs
        self.fn = make_cascade(configs)
        self.compiled: dict[int, Any] = {}
        self.seed = seed

    def args(self, batch: int):
        ids, mask = self.prompts(batch)
        null_ids, null_mask = self.prompts.null
        self.seed += 1
        return (self.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(null_ids), jnp.asarray(null_mask),
                jnp.int32(self.seed))

    def compile(self, batch: int, fn=None) -> dict[str, float]:
        """AOT-compiles ``fn`` (default: the jitted cascade) for ``batch``; returns the seconds
        of tracing+lowering and of compiling (a persistent-cache hit loads instead)."""
        fn = self.fn if fn is None else fn
        args = self.args(batch)
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        self.compiled[batch] = lowered.compile()
        t2 = time.perf_counter()
        return {"trace_lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)}

    def run(self, batch: int) -> tuple[float, np.ndarray]:
        """(seconds, images) of one full call at ``batch`` (compiles first if needed)."""
        if batch not in self.compiled:
            self.compile(batch)
        t0 = time.perf_counter()
        images = np.asarray(self.compiled[batch](*self.args(batch)))
        return time.perf_counter() - t0, images

    def abstract_args(self, batch: int):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.args(batch))

    def export(self, batch: int) -> bytes:
        """The cascade at ``batch`` serialised with ``jax.export`` (StableHLO; no tracing needed
        to run it again in another process)."""
        from jax import export
        # The file is read back on this machine only (a warm start), so cuDNN attention's
        # custom calls, which carry no cross-version guarantee, may be serialised.
        checks = [export.DisabledSafetyCheck.custom_call(f"__cudnn$fmha{kind}")
                  for kind in ("Softmax", "ScaleBiasSoftmax", "SoftmaxDropout", "ScaleBiasSoftmaxDropout")]
        return export.export(self.fn, disabled_checks=checks)(*self.abstract_args(batch)).serialize()


def exported_callable(blob: bytes):
    """A jitted callable of a :meth:`Runner.export` blob (same arguments as the cascade)."""
    from jax import export
    return jax.jit(export.deserialize(bytearray(blob)).call)
