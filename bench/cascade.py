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


def make_cascade(configs: Mapping[str, Any], *, sampling: Mapping[str, Any] = SAMPLING) -> Callable:
    """``cascade(params, ids, mask, null_ids, null_mask, seed) -> images (B, S, S, 3)``, jitted.

    ``ids``/``mask`` (B, 77) int32/bool: the prompts' tokens and real-token mask;
    ``null_ids``/``null_mask`` (1, 77): the "" prompt's; ``seed`` an int32 scalar (the PRNG
    key is made inside, so the program has only plain array arguments and can be exported
    with ``jax.export``). Images are float32 in [0, 1], as ``UnCLIPPipeline(output_type="np")``.
    """
    from unclip_jax.models.clip import CLIPModel
    from unclip_jax.stages.decoder import sample_decoder
    from unclip_jax.stages.prior import sample_prior
    from unclip_jax.stages.upsampler import sample_upsampler

    clip = CLIPModel(configs["clip"])
    prior_cfg, dec_cfg, sr_cfg = configs["prior"], configs["decoder"], configs["super_res"]
    sr_size = int(sr_cfg["sample_size"])

    def encode(params, ids):
        return clip.apply({"params": params}, ids, None, method="encode_text")

    def cascade(params, ids, mask, null_ids, null_mask, seed):
        k_prior, k_dec, k_sr = jax.random.split(jax.random.key(seed), 3)
        # Named scopes put the stage into every op's metadata (bench/profile.py splits a
        # device trace by stage with them); they do not change the computation.
        with jax.named_scope("clip_text"):
            text_embed, text_hidden = encode(params["clip"], ids)
            null_embed, null_hidden = encode(params["clip"], null_ids)
        with jax.named_scope("prior"):
            z_i = sample_prior(params["prior"], params["prior_stats"], prior_cfg, text_embed, text_hidden, mask,
                               null_embed, null_hidden, null_mask, k_prior, steps=sampling["prior_steps"],
                               guidance_scale=sampling["prior_guidance"], clip_range=sampling["prior_clip_range"],
                               best_of_n=1)
        with jax.named_scope("decoder"):
            low = sample_decoder(params["decoder"], dec_cfg, z_i, text_embed, text_hidden, mask, k_dec,
                                 steps=sampling["decoder_steps"], guidance_scale=sampling["decoder_guidance"],
                                 null_text_embed=null_embed, null_text_hidden=null_hidden, null_text_mask=null_mask)
        with jax.named_scope("super_res"):
            high = sample_upsampler(params["sr_first"], params["sr_last"], sr_cfg, low, k_sr,
                                    steps=sampling["super_res_steps"], out_size=sr_size)
        return jnp.clip(high * 0.5 + 0.5, 0.0, 1.0).astype(jnp.float32)

    return jax.jit(cascade)


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
