"""The unCLIP cascade as one API: text → CLIP → prior → decoder → upsamplers → images.

Every stage is also callable on its own (``encode_text``, ``prior``, ``decode``,
``upsample``); each one's whole diffusion loop is one jitted ``lax.scan`` (the stage
samplers of ``unclip_jax.stages``). The batch is sharded over all devices with a
``NamedSharding`` on a 1-D ``('data',)`` mesh (the jit path that ``jax.pmap`` itself is
built on); parameters are replicated.

Randomness is per example: example ``i`` of a call draws its initial latents and
per-step noise from ``fold_in(fold_in(PRNGKey(seed), stage), i)``. So the same seed gives
the same images whatever the batch padding or the device count.

A pipeline directory (written by :func:`save_pipeline`, read by :func:`load_pipeline`)::

    pipeline.json        components present, null-text rule, sampling defaults
    tokenizer/           CLIP tokenizer files (vocab.json, merges.txt, ...)
    clip/                our CLIP (config.json + params/), text tower, maybe vision tower
    prior/               config.json + params/{params, stats}
    decoder/             config.json + params/{text_proj, unet}
    upsampler_0/first/   config.json + params/ (and upsampler_0/last/, Karlo's last-step model)

Null conditioning (classifier-free guidance): the prior and the decoder use the CLIP
encoding of the empty prompt "" as their unconditional branch, as Karlo and diffusers do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import threading
import time
import warnings
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from unclip_jax import latent_math
from unclip_jax.compute_options import ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES
from unclip_jax.convert.common import ConversionError, load_pretrained, save_pretrained
from unclip_jax.image_output import to_uint8
from unclip_jax.models.clip import CLIPConfig, CLIPModel
from unclip_jax.stages import decoder as decoder_stage
from unclip_jax.stages import prior as prior_stage
from unclip_jax.stages import upsampler as upsampler_stage
from unclip_jax.tokenizer import CLIPTokenizer, load_tokenizer

FORMAT = "unclip_jax.pipeline"
VERSION = 1

# Karlo / diffusers UnCLIPPipeline defaults, plus the paper's best-of-n for the prior.
# ``decoder_best_of_n`` > 1 makes that many images per prompt (decoder and upsamplers) and
# keeps the one CLIP scores closest to the prompt (the paper's best-of-n, applied to images).
DEFAULT_SETTINGS = dict(prior_steps=25, prior_guidance=4.0, prior_clip_range=5.0, best_of_n=2,
                        decoder_steps=25, decoder_guidance=8.0, upsampler_steps=7, decoder_best_of_n=1)

# Noise-index offset between decoder candidates: far above any batch, so that candidate 0 is
# exactly what ``decode`` gives and no two candidates share noise.
_CANDIDATE_STRIDE = 1 << 20
_MAX_DECODER_BEST_OF_N = 64

# Stage ids folded into the seed so that stages never share random draws.
_STAGE_PRIOR, _STAGE_DECODER, _STAGE_UPSAMPLER = 1, 2, 3


class PipelineError(ValueError):
    """Bad input or a pipeline directory that does not fit; raised before any compilation."""


class TextEncoding(NamedTuple):
    embed: jax.Array    # (B, D) CLIP text embedding z_t (projected, not normalised)
    hidden: jax.Array   # (B, L, W) final per-token hidden states
    mask: jax.Array     # (B, L) bool, True on real tokens


@dataclasses.dataclass
class Upsampler:
    """One cascade step: its config and the parameters of its first n−1 steps and last step."""
    config: dict
    params_first: Any
    params_last: Any = None


# ----------------------------------------------------------------------------- timing

class _CompileClock:
    """Sums XLA backend-compile time reported by ``jax.monitoring`` inside ``measure()``."""

    _lock = threading.Lock()
    _installed = False
    _total = 0.0

    @classmethod
    def _listener(cls, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            cls._total += duration

    @classmethod
    @contextlib.contextmanager
    def measure(cls) -> Iterator[dict]:
        with cls._lock:
            if not cls._installed:
                jax.monitoring.register_event_duration_secs_listener(cls._listener)
                cls._installed = True
        out, start, wall = {}, cls._total, time.perf_counter()
        try:
            yield out
        finally:
            out["compile_s"] = cls._total - start
            out["wall_s"] = time.perf_counter() - wall


# ----------------------------------------------------------------------------- randomness

def example_noise(key: jax.Array, indices: jax.Array, shape: tuple[int, ...], steps: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Per-example x_T (B, *shape) and per-step noise (steps, B, *shape) from fold_in(key, i)."""
    def one(i):
        k_init, k_steps = jax.random.split(jax.random.fold_in(key, i))
        return jax.random.normal(k_init, shape), jax.random.normal(k_steps, (steps,) + shape)
    init, noise = jax.vmap(one)(indices)
    return init, jnp.moveaxis(noise, 1, 0)


# ----------------------------------------------------------------------------- pipeline

def _local(x: jax.Array) -> jax.Array:
    """This process's copy of a replicated array, as an ordinary single-device array."""
    return jnp.asarray(np.asarray(x))


def _on_own_mesh(method):
    """Runs a model-calling method with the pipeline's mesh as JAX's context mesh: splash
    attention (a TPU kernel that GSPMD cannot partition) shards itself over that mesh."""
    @functools.wraps(method)
    def on_mesh(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return method(self, *args, **kwargs)
    return on_mesh


@dataclasses.dataclass
class UnCLIPPipeline:
    """The whole cascade; any stage after CLIP may be missing (the cascade stops before it).

    Attributes:
      tokenizer: the CLIP tokenizer (77 positions, pad id 0).
      clip_config, clip_params: CLIP with a text tower (and a vision tower for variations).
      prior_config, prior_params, prior_stats: the diffusion prior (stats: clip_mean/std).
      decoder_config, decoder_params: the decoder ``{'text_proj', 'unet'}``.
      upsamplers: cascade steps after the decoder, in order.
      defaults: sampling settings used when a call does not override them.
    """
    tokenizer: CLIPTokenizer
    clip_config: CLIPConfig
    clip_params: Any
    prior_config: dict | None = None
    prior_params: Any = None
    prior_stats: Any = None
    decoder_config: dict | None = None
    decoder_params: Any = None
    upsamplers: list[Upsampler] = dataclasses.field(default_factory=list)
    defaults: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SETTINGS))

    def __post_init__(self):
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
        self._clip = CLIPModel(self.clip_config)
        # CLIP runs replicated on the mesh (one program over all processes' devices, which
        # splash attention needs); callers get host-local copies of its small outputs.
        everywhere = NamedSharding(self.mesh, P())
        self._encode_text = jax.jit(lambda p, ids: self._clip.apply({"params": p}, ids, None,
                                                                    method=CLIPModel.encode_text),
                                    out_shardings=everywhere)
        self._encode_image = jax.jit(lambda p, px: self._clip.apply({"params": p}, px,
                                                                    method=CLIPModel.encode_image),
                                     out_shardings=everywhere)
        self._replicated: dict[str, Any] = {}

    # ------------------------------------------------------------------ placement

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def _padded(self, n: int) -> int:
        return -(-n // self.num_devices) * self.num_devices

    def _shard(self, x, axis: int = 0) -> jax.Array:
        """Places a host array (identical on every process) with its ``axis`` over 'data'."""
        x = np.asarray(x)
        spec = [None] * x.ndim
        spec[axis] = "data"
        sharding = NamedSharding(self.mesh, P(*spec))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _everywhere(self, x) -> jax.Array:
        """A host array (identical on every process) replicated on every device of the mesh."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, P()), lambda idx: x[idx])

    def _replicate(self, name: str, tree):
        if name not in self._replicated:
            sharding = NamedSharding(self.mesh, P())
            self._replicated[name] = jax.tree.map(
                lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                tree)
        return self._replicated[name]

    @staticmethod
    def _first_rows(x: jax.Array, n: int) -> jax.Array:
        """The first ``n`` rows of a stage's batch-sharded output, readable by this process:
        with several processes each one holds only its devices' rows, so every process
        gathers the whole batch (the next stage, ``np.asarray`` and image saving need it)."""
        if jax.process_count() == 1:
            return x[:n]
        from jax.experimental import multihost_utils
        return jnp.asarray(np.asarray(multihost_utils.process_allgather(x, tiled=True))[:n])

    def _pad(self, x, n_to: int):
        x = np.asarray(x)
        if len(x) == n_to:
            return x
        return np.concatenate([x, np.repeat(x[-1:], n_to - len(x), axis=0)])

    # ------------------------------------------------------------------ stages

    def settings(self, **overrides) -> dict:
        """The defaults updated with ``overrides``; unknown names and bad values fail here."""
        unknown = set(overrides) - set(DEFAULT_SETTINGS)
        if unknown:
            raise PipelineError(f"unknown sampling setting(s) {sorted(unknown)}; known: {sorted(DEFAULT_SETTINGS)}")
        s = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        for name in ("prior_steps", "decoder_steps", "upsampler_steps", "best_of_n", "decoder_best_of_n"):
            if int(s[name]) < 1 or int(s[name]) != s[name]:
                raise PipelineError(f"{name} must be a positive integer, got {s[name]!r}")
            if name.endswith("steps") and int(s[name]) > 1000:
                raise PipelineError(f"{name} must be at most 1000 (the training timesteps), got {s[name]}")
        if int(s["decoder_best_of_n"]) > _MAX_DECODER_BEST_OF_N:
            raise PipelineError(f"decoder_best_of_n must be at most {_MAX_DECODER_BEST_OF_N}, "
                                f"got {s['decoder_best_of_n']}")
        for name in ("prior_guidance", "decoder_guidance"):
            if not 0.0 <= float(s[name]) <= 100.0:
                raise PipelineError(f"{name} must be in [0, 100], got {s[name]!r}")
        return s

    def tokenize(self, prompts: Sequence[str]):
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise PipelineError("no prompts given")
        if not all(isinstance(p, str) for p in prompts):
            raise PipelineError("prompts must be strings")
        return self.tokenizer(list(prompts))

    @_on_own_mesh
    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Prompts → (z_t (B, D), per-token states (B, 77, W), mask (B, 77)).

        The text tower runs with the causal mask only, as Karlo and diffusers do; padded
        positions are masked by the prior and the decoder.
        """
        tokens = self.tokenize(prompts)
        embed, hidden = self._encode_text(self._replicate("clip", self.clip_params),
                                          self._everywhere(tokens.input_ids))
        return TextEncoding(_local(embed), _local(hidden), jnp.asarray(tokens.attention_mask))

    @_on_own_mesh
    def encode_image(self, images: Sequence[np.ndarray]) -> jax.Array:
        """uint8 (H, W, 3) images of any size → CLIP image embeddings z_i (B, D)."""
        from unclip_jax.clip_preprocess import preprocess_images
        if self.clip_config.vision is None:
            raise PipelineError("this pipeline's CLIP has no image tower; image variations need one "
                                "(convert a full CLIP with `python -m unclip_jax.convert.clip` and pass "
                                "it as the pipeline's clip)")
        size = self.clip_config.vision.image_size
        pixels = preprocess_images(list(images), size=size)
        return _local(self._encode_image(self._replicate("clip", self.clip_params), self._everywhere(pixels)))

    def _null_text(self) -> TextEncoding:
        if not hasattr(self, "_null"):
            self._null = self.encode_text([""])
        return self._null

    @_on_own_mesh
    def prior(self, text: TextEncoding, seed: int, *, first_index: int = 0, **overrides) -> jax.Array:
        """Samples CLIP image embeddings z_i (B, D) for the encoded prompts; prompt i draws
        the noise of example ``first_index + i``."""
        if self.prior_params is None:
            raise PipelineError("this pipeline has no prior")
        s = self.settings(**overrides)
        b, d, n = text.embed.shape[0], text.embed.shape[-1], int(s["best_of_n"])
        bp = self._padded(b)
        init, noise = example_noise(jax.random.fold_in(jax.random.PRNGKey(seed), _STAGE_PRIOR),
                                    first_index + jnp.arange(bp), (n, d), int(s["prior_steps"]))
        null = self._null_text()
        out = prior_stage.sample_prior(
            self._replicate("prior", self.prior_params),
            None if self.prior_stats is None else self._replicate("prior_stats", self.prior_stats),
            self.prior_config,
            self._shard(self._pad(text.embed, bp)), self._shard(self._pad(text.hidden, bp)),
            self._shard(self._pad(text.mask, bp)), null.embed[0], null.hidden[0], null.mask[0], None,
            steps=int(s["prior_steps"]), guidance_scale=float(s["prior_guidance"]),
            clip_range=s["prior_clip_range"], best_of_n=n,
            init_latents=self._shard(np.asarray(init if n > 1 else init[:, 0])),
            noise=self._shard(np.asarray(noise if n > 1 else noise[:, :, 0]), axis=1))
        return self._first_rows(out, b)

    @_on_own_mesh
    def decode(self, image_embed: jax.Array, text: TextEncoding, seed: int, *,
               first_index: int = 0, **overrides) -> jax.Array:
        """Decoder: z_i (B, D) + the prompts' encodings → (B, S, S, 3) images in [−1, 1]."""
        if self.decoder_params is None:
            raise PipelineError("this pipeline has no decoder")
        s = self.settings(**overrides)
        b = image_embed.shape[0]
        bp = self._padded(b)
        spec = decoder_stage.decoder_spec(self.decoder_config)
        size = spec["image_size"]
        init, noise = example_noise(jax.random.fold_in(jax.random.PRNGKey(seed), _STAGE_DECODER),
                                    first_index + jnp.arange(bp), (size, size, 3), int(s["decoder_steps"]))
        null = self._null_text()
        out = decoder_stage.sample_decoder(
            self._replicate("decoder", self.decoder_params), self.decoder_config,
            self._shard(self._pad(image_embed, bp)), self._shard(self._pad(text.embed, bp)),
            self._shard(self._pad(text.hidden, bp)), self._shard(self._pad(text.mask, bp)),
            jax.random.PRNGKey(seed),  # unused: x_T and the per-step noise are given
            steps=int(s["decoder_steps"]), guidance_scale=float(s["decoder_guidance"]),
            null_text_embed=null.embed, null_text_hidden=null.hidden, null_text_mask=null.mask,
            init_latents=self._shard(np.asarray(init)), noise=self._shard(np.asarray(noise), axis=1))
        return self._first_rows(out, b)

    def pick_best_images(self, candidates: Sequence[jax.Array], text: TextEncoding) -> jax.Array:
        """Per prompt, the candidate whose CLIP image embedding has the highest cosine with
        the prompt's z_t (ties keep the earlier one): n arrays (B, S, S, 3) in [−1, 1] →
        (B, S, S, 3). The paper's best-of-n, applied to images instead of z_i."""
        z_t = latent_math.l2_normalize(text.embed)
        scores = jnp.stack([  # (n, B)
            jnp.sum(latent_math.l2_normalize(self.encode_image(list(to_uint8(np.asarray(c))))) * z_t, axis=-1)
            for c in candidates])
        index = jnp.argmax(scores, axis=0)  # the first maximum: ties keep the earlier candidate
        return jnp.stack(candidates)[index, jnp.arange(index.shape[0])]

    @_on_own_mesh
    def upsample(self, images: jax.Array, seed: int, *, first_index: int = 0, **overrides) -> jax.Array:
        """Runs every upsampler in turn on (B, s, s, 3) images in [−1, 1]."""
        s = self.settings(**overrides)
        b = images.shape[0]
        bp = self._padded(b)
        for k, up in enumerate(self.upsamplers):
            spec = upsampler_stage.upsampler_spec(up.config)
            size = spec["image_size"]
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _STAGE_UPSAMPLER), k)
            init, noise = example_noise(key, first_index + jnp.arange(bp), (size, size, 3),
                                        int(s["upsampler_steps"]))
            params_first = self._replicate(f"up{k}_first", up.params_first)
            params_last = (params_first if up.params_last is None
                           else self._replicate(f"up{k}_last", up.params_last))
            images = self._first_rows(upsampler_stage.sample_upsampler(
                params_first, params_last, up.config, self._shard(self._pad(np.asarray(images), bp)),
                jax.random.PRNGKey(seed),  # unused: x_T and the per-step noise are given
                steps=int(s["upsampler_steps"]), out_size=size,
                init_latents=self._shard(np.asarray(init)), noise=self._shard(np.asarray(noise), axis=1)), b)
        return images

    # ------------------------------------------------------------------ cascades

    def text_to_image(self, prompts: Sequence[str], seed: int = 0, *, progress: bool = False,
                      max_batch: int | None = None, **overrides) -> dict[str, Any]:
        """Prompts → uint8 images through every stage present.

        ``max_batch``: at most this many prompts go through the cascade at once (the rest
        follow in further calls, each a batch of its own; None: all at once). Each prompt's
        noise depends on its index in ``prompts`` only, so the images do not depend on it.

        Returns a dict: ``images`` uint8 (B, H, W, 3), ``image_embeds`` (B, D),
        ``timings`` {stage: {'wall_s', 'compile_s'}} summed over the batches, ``settings``,
        ``stopped_at`` (the last stage run: 'decoder' or 'upsampler_k').
        """
        settings = self.settings(**overrides)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.tokenize(prompts)  # input errors before any compilation
        if max_batch is not None and int(max_batch) < 1:
            raise PipelineError(f"max_batch must be >= 1, got {max_batch}")
        if self.decoder_params is None:
            raise PipelineError("this pipeline has no decoder: it cannot make images")
        # Only text_to_image ranks candidates: other calls ignore decoder_best_of_n.
        if int(settings["decoder_best_of_n"]) > 1 and self.clip_config.vision is None:
            raise PipelineError("decoder_best_of_n > 1 ranks images with CLIP's image tower, which "
                                "this pipeline's CLIP lacks; use decoder_best_of_n=1")
        stages = ["clip", "prior", "decoder"] + [f"upsampler_{k}" for k in range(len(self.upsamplers))]
        size = len(prompts) if max_batch is None else int(max_batch)
        starts = range(0, len(prompts), size)
        bar = _progress(len(stages) * len(starts), progress)
        timings: dict[str, dict] = {}
        images, embeds = [], []
        for first in starts:
            batch_images, z_i = self._text_to_image_batch(prompts[first:first + size], seed, first, settings,
                                                          timings, bar)
            images.append(to_uint8(np.asarray(batch_images)))
            embeds.append(np.asarray(z_i))
        bar.close()
        return {"images": np.concatenate(images), "image_embeds": np.concatenate(embeds),
                "timings": timings, "settings": settings, "stopped_at": stages[-1]}

    def _text_to_image_batch(self, prompts: list[str], seed: int, first_index: int, settings: dict,
                             timings: dict, bar) -> tuple[jax.Array, jax.Array]:
        """One batch of :meth:`text_to_image`: (images (B, S, S, 3) in [−1, 1], z_i (B, D));
        adds each stage's times to ``timings`` and ticks ``bar`` once per stage."""
        def timed(stage: str, clock: dict) -> None:
            total = timings.setdefault(stage, {"wall_s": 0.0, "compile_s": 0.0})
            for key in total:
                total[key] += clock[key]

        with _CompileClock.measure() as t:
            text = self.encode_text(prompts)
            jax.block_until_ready(text)
        timed("clip", t)
        bar.update()
        with _CompileClock.measure() as t:
            z_i = jax.block_until_ready(self.prior(text, seed, first_index=first_index, **settings))
        timed("prior", t)
        bar.update()
        # decoder_best_of_n candidates per prompt, each with its own noise (candidate 0 is the
        # plain sample); CLIP ranks the final images.
        offsets = [first_index + c * _CANDIDATE_STRIDE for c in range(int(settings["decoder_best_of_n"]))]
        with _CompileClock.measure() as t:
            candidates = [jax.block_until_ready(self.decode(z_i, text, seed, first_index=o, **settings))
                          for o in offsets]
        timed("decoder", t)
        bar.update()
        if self.upsamplers:
            with _CompileClock.measure() as t:
                candidates = [jax.block_until_ready(self.upsample(c, seed, first_index=o, **settings))
                              for c, o in zip(candidates, offsets)]
            timed("upsamplers", t)
            bar.update(len(self.upsamplers))
        images = candidates[0] if len(candidates) == 1 else self.pick_best_images(candidates, text)
        return images, z_i

    def images_from_embeddings(self, image_embed: jax.Array, seed: int = 0, prompts: Sequence[str] | None = None,
                               **overrides) -> np.ndarray:
        """Decoder (+ upsamplers) from given CLIP image embeddings; prompts default to ""."""
        b = image_embed.shape[0]
        text = self.encode_text(prompts if prompts is not None else [""] * b)
        images = self.decode(jnp.asarray(image_embed), text, seed, **overrides)
        if self.upsamplers:
            images = self.upsample(images, seed, **overrides)
        return to_uint8(np.asarray(images))

    def variations(self, images: Sequence[np.ndarray], seed: int = 0, num_per_image: int = 1, *,
                   invert: bool = False, eta: float = 0.8, ddim_steps: int = 50, strength: float = 1.0,
                   **overrides) -> np.ndarray:
        """Image variations (paper §3.1). Returns uint8 (N·num, H, W, 3).

        ``invert=False``: z_i = CLIP(image), decoded with fresh noise and the empty prompt
        (Karlo's image-variation sampler). ``invert=True``: the paper's bipartite latent:
        x_T = DDIM inversion of the image, then DDIM with ``eta`` > 0 from (z_i, x_T), which
        keeps the image's layout (η = 0 reconstructs it).
        """
        if num_per_image < 1:
            raise PipelineError(f"num_per_image must be >= 1, got {num_per_image}")
        if not invert:
            z_i = jnp.repeat(self.encode_image(images), num_per_image, axis=0)
            return self.images_from_embeddings(z_i, seed, **overrides)
        z_i, x_T = self.invert(images, steps=ddim_steps, strength=strength)
        images_out = self.ddim_decode(jnp.repeat(z_i, num_per_image, axis=0), jnp.repeat(x_T, num_per_image, axis=0),
                                      seed, steps=ddim_steps, eta=eta, strength=strength)
        if self.upsamplers:
            images_out = self.upsample(images_out, seed, **overrides)
        return to_uint8(np.asarray(images_out))

    def _decoder_model_fn(self, image_embed: jax.Array, text: TextEncoding):
        """The conditional (unguided) decoder as f(x_t, t) -> [ε, v], and its diffusion spec."""
        spec = decoder_stage.decoder_spec(self.decoder_config)
        proj, unet = decoder_stage.build_models(spec)
        params = self.decoder_params
        context, context_mask, added = proj.apply({"params": params["text_proj"]}, image_embed, text.embed,
                                                  text.hidden, text.mask)

        def model_fn(x, t):
            return unet.apply({"params": params["unet"]}, x, t, added_emb=added, context=context,
                              context_mask=context_mask)
        return model_fn, spec

    @_on_own_mesh
    def invert(self, images: Sequence[np.ndarray], *, steps: int = 50, fixed_point_iters: int = 2,
               strength: float = 1.0) -> tuple[jax.Array, jax.Array]:
        """DDIM inversion through the decoder (paper §3.1's bipartite latent).

        Returns (z_i (N, D), x_T (N, S, S, 3)): the CLIP image embedding of each image and
        the decoder latent that deterministic DDIM (η = 0, same ``steps``) maps back to the
        image (resized to the decoder's resolution), conditioned on z_i and the empty prompt.
        ``strength`` < 1 inverts only up to that fraction of the noise levels (partial
        inversion: a less noisy x_T that keeps more of the image); decode with the same value.
        """
        from unclip_jax import diffusion
        from unclip_jax.data.augment import resize
        if self.decoder_params is None:
            raise PipelineError("this pipeline has no decoder")
        z_i = self.encode_image(images)
        spec = decoder_stage.decoder_spec(self.decoder_config)
        size = spec["image_size"]
        x0 = jnp.stack([jnp.asarray(resize(np.asarray(im, np.float32)[None] / 127.5 - 1.0, size))[0]
                        for im in images])
        text = self.encode_text([""] * len(images))
        diff = spec["diffusion"]
        ts = _ddim_timesteps(steps, diff["num_timesteps"], strength)

        @jax.jit
        def run(z_i, x0):
            model_fn, _ = self._decoder_model_fn(z_i, text)
            schedule = diffusion.Schedule.create(diff["schedule"], diff["num_timesteps"])
            return diffusion.ddim_invert(model_fn, x0, ts, schedule, prediction_type=diff["prediction_type"],
                                         fixed_point_iters=fixed_point_iters)
        return z_i, run(z_i, x0)

    @_on_own_mesh
    def ddim_decode(self, image_embed: jax.Array, x_T: jax.Array, seed: int = 0, *, steps: int = 50,
                    eta: float = 0.0, strength: float = 1.0) -> jax.Array:
        """DDIM decoding from a given x_T (N, S, S, 3), unguided, as the paper's variations:
        η = 0 reconstructs the inverted image, η > 0 gives variations that keep its layout.
        Returns images in [−1, 1]."""
        from unclip_jax import diffusion
        spec = decoder_stage.decoder_spec(self.decoder_config)
        diff = spec["diffusion"]
        ts = _ddim_timesteps(steps, diff["num_timesteps"], strength)
        n = x_T.shape[0]
        text = self.encode_text([""] * n)
        _, noise = example_noise(jax.random.fold_in(jax.random.PRNGKey(seed), _STAGE_DECODER), jnp.arange(n),
                                 tuple(x_T.shape[1:]), len(ts))

        @jax.jit
        def run(z_i, x_T, noise):
            model_fn, _ = self._decoder_model_fn(z_i, text)
            schedule = diffusion.Schedule.create(diff["schedule"], diff["num_timesteps"])
            x0 = diffusion.ddim_sample(model_fn, x_T, ts, schedule, eta=float(eta),
                                       prediction_type=diff["prediction_type"],
                                       clip_range=diff.get("clip_range", 1.0),
                                       noise=None if eta == 0 else noise)
            return jnp.clip(x0, -1.0, 1.0)
        return run(jnp.asarray(image_embed), jnp.asarray(x_T), noise)

    def interpolate(self, a: jax.Array, b: jax.Array, num: int, seed: int = 0, **overrides) -> np.ndarray:
        """Decodes slerp(a, b, θ) for θ in linspace(0, 1, num), with one fixed x_T (the
        paper's Fig. 4 setting): every frame uses the same per-example noise. a, b: (D,)."""
        if num < 2:
            raise PipelineError(f"interpolation needs num >= 2 frames, got {num}")
        thetas = jnp.linspace(0.0, 1.0, num)
        z = latent_math.slerp(jnp.broadcast_to(a, (num,) + a.shape), jnp.broadcast_to(b, (num,) + b.shape), thetas)
        return self._fixed_noise_decode(z, seed, **overrides)

    def text_diff(self, image: np.ndarray, prompt: str, base_prompt: str = "a photo",
                  thetas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), seed: int = 0,
                  **overrides) -> np.ndarray:
        """Text diffs (paper §3.3): z_θ = slerp(z_i, norm(z_t − z_t0), θ), x_T fixed."""
        z_i = self.encode_image([image])[0]
        enc = self.encode_text([prompt, base_prompt])
        z = latent_math.text_diff(jnp.broadcast_to(z_i, (len(thetas), z_i.shape[-1])), enc.embed[0],
                                  enc.embed[1], jnp.asarray(thetas, jnp.float32))
        return self._fixed_noise_decode(z, seed, **overrides)

    def _fixed_noise_decode(self, z: jax.Array, seed: int, **overrides) -> np.ndarray:
        # first_index stays 0 for every frame: decode one frame per call so each uses example 0's noise.
        text = self.encode_text([""])
        frames = []
        for row in z:
            img = self.decode(row[None], text, seed, **overrides)
            if self.upsamplers:
                img = self.upsample(img, seed, **overrides)
            frames.append(np.asarray(img)[0])
        return to_uint8(np.stack(frames))


def _ddim_timesteps(steps: int, num_timesteps: int, strength: float) -> np.ndarray:
    """DDIM's integer-stride timesteps (they skip the cosine schedule's t = 999, where
    ᾱ ≈ 2e-9 makes inversion ill-conditioned), cut to the first ``strength`` of the levels."""
    from unclip_jax import diffusion
    if not 0.0 < strength <= 1.0:
        raise PipelineError(f"strength must be in (0, 1], got {strength}")
    ts = diffusion.respace(f"ddim{int(steps)}", num_timesteps)
    return ts[ts <= strength * (num_timesteps - 1)]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="cascade", unit="stage", disable=not enabled or jax.process_index() != 0)


# ----------------------------------------------------------------------------- storage

def save_pipeline(out_dir: str, pipe: UnCLIPPipeline, tokenizer_dir: str, *,
                  storage_dtype: str | None = None) -> None:
    """Writes ``pipe`` as a pipeline directory (module doc); ``tokenizer_dir`` is copied.

    ``storage_dtype`` ('float16' | 'float32'): store each component's parameters as one
    flat safetensors file in that dtype (compact; what the package ships) instead of
    orbax checkpoints.
    """
    from unclip_jax.convert.prior import save_prior
    os.makedirs(out_dir, exist_ok=True)
    tok_out = os.path.join(out_dir, "tokenizer")
    if os.path.abspath(tokenizer_dir) != os.path.abspath(tok_out):
        shutil.copytree(tokenizer_dir, tok_out, dirs_exist_ok=True)
    save_pretrained(os.path.join(out_dir, "clip"), pipe.clip_params, pipe.clip_config.to_dict(),
                    storage_dtype=storage_dtype)
    components = {"tokenizer": "tokenizer", "clip": "clip"}
    if pipe.prior_params is not None:
        save_prior(os.path.join(out_dir, "prior"), pipe.prior_params, pipe.prior_stats or {}, pipe.prior_config,
                   storage_dtype=storage_dtype)
        components["prior"] = "prior"
    if pipe.decoder_params is not None:
        save_pretrained(os.path.join(out_dir, "decoder"), pipe.decoder_params, pipe.decoder_config,
                        storage_dtype=storage_dtype)
        components["decoder"] = "decoder"
    ups = []
    for k, up in enumerate(pipe.upsamplers):
        entry = {"first": f"upsampler_{k}/first"}
        save_pretrained(os.path.join(out_dir, entry["first"]), up.params_first, up.config, storage_dtype=storage_dtype)
        if up.params_last is not None:
            entry["last"] = f"upsampler_{k}/last"
            save_pretrained(os.path.join(out_dir, entry["last"]), up.params_last, up.config, storage_dtype=storage_dtype)
        ups.append(entry)
    components["upsamplers"] = ups
    with open(os.path.join(out_dir, "pipeline.json"), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "components": components,
                   "null_text": "empty_prompt", "defaults": pipe.defaults}, f, indent=2)


def with_compute_settings(config: dict, dtype: str | None = None, attention: str | None = None) -> dict:
    """A copy of a stage's config whose networks compute in ``dtype`` with attention
    ``attention`` (None keeps the saved value). Parameters stay float32 either way.

    A trained stage keeps these under ``model``; an imported decoder or upsampler in
    ``unet`` (and the decoder's ``text_proj`` for the dtype); an imported prior at the top.
    """
    cfg = json.loads(json.dumps(config))
    settings = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention)) if v is not None}
    if "model" in cfg:
        cfg["model"].update(settings)
    elif "unet" in cfg:
        cfg["unet"].update(settings)
        if dtype is not None and "text_proj" in cfg:
            cfg["text_proj"]["dtype"] = dtype
    else:
        cfg.update(settings)
    return cfg


def _check_compute_settings(dtype: str | None, attention: str | None) -> None:
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise PipelineError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    if attention is not None and attention not in ATTENTION_IMPLEMENTATIONS:
        raise PipelineError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
    backend = jax.default_backend()
    if attention == "splash" and backend == "gpu":
        raise PipelineError("attention 'splash' is a TPU kernel; on GPUs use 'cudnn' or 'auto'")
    if attention == "cudnn" and backend != "gpu":
        raise PipelineError(f"attention 'cudnn' needs an NVIDIA GPU (this is {backend}); use 'auto', "
                            "which falls back to 'xla', or 'splash' on a TPU")


def load_pipeline(path: str, *, dtype: str | None = None, attention: str | None = None) -> UnCLIPPipeline:
    """Reads a pipeline directory; fails with a clear message on a missing or mismatched part.

    ``dtype`` ("float32", "bfloat16", "float16") and ``attention`` ("xla", "cudnn", "splash",
    "auto") replace every network's saved compute dtype and attention implementation
    (None keeps them): e.g. ``dtype="bfloat16", attention="splash"`` on a TPU. They live in
    the stage configs, so ``save_pipeline`` writes them out with the rest.
    """
    from unclip_jax.convert.prior import load_prior
    _check_compute_settings(dtype, attention)
    manifest_path = os.path.join(path, "pipeline.json")
    if not os.path.exists(manifest_path):
        raise PipelineError(f"{path!r} is not a pipeline directory (no pipeline.json). Convert Karlo with "
                            "`python -m unclip_jax.convert karlo --src=DIR --out=DIR`, or export trained "
                            "stages with `python -m unclip_jax.export`")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, or not JSON (e.g. a truncated copy)
        raise PipelineError(f"cannot read {manifest_path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PipelineError(f"{manifest_path} has format {found!r}, expected {FORMAT!r}")
    try:
        comp = manifest["components"]
        tokenizer = load_tokenizer(os.path.join(path, comp["tokenizer"]))
        clip_params, clip_cfg = load_pretrained(os.path.join(path, comp["clip"]))
        clip_config = CLIPConfig.from_dict(clip_cfg)
        clip_config = dataclasses.replace(clip_config, dtype=dtype or clip_config.dtype,
                                          attention=attention or clip_config.attention)
        pipe = UnCLIPPipeline(tokenizer, clip_config, clip_params,
                              defaults={**DEFAULT_SETTINGS, **manifest.get("defaults", {})})
        if "prior" in comp:
            pipe.prior_params, pipe.prior_stats, pipe.prior_config = load_prior(os.path.join(path, comp["prior"]))
            pipe.prior_stats = pipe.prior_stats or None
        if "decoder" in comp:
            pipe.decoder_params, pipe.decoder_config = load_pretrained(os.path.join(path, comp["decoder"]))
        for entry in comp.get("upsamplers", []):
            first, cfg = load_pretrained(os.path.join(path, entry["first"]))
            last = load_pretrained(os.path.join(path, entry["last"]))[0] if "last" in entry else None
            pipe.upsamplers.append(Upsampler(cfg, first, last))
    except (ConversionError, KeyError, TypeError, OSError, ValueError) as e:  # missing, corrupt or mismatched files
        raise PipelineError(f"cannot load pipeline {path!r}: {e!r}") from e
    _check_fits(pipe)
    if dtype is not None or attention is not None:
        if pipe.prior_config is not None:
            pipe.prior_config = with_compute_settings(pipe.prior_config, dtype, attention)
        if pipe.decoder_config is not None:
            pipe.decoder_config = with_compute_settings(pipe.decoder_config, dtype, attention)
        pipe.upsamplers = [dataclasses.replace(up, config=with_compute_settings(up.config, dtype, attention))
                           for up in pipe.upsamplers]
    return pipe


def _check_fits(pipe: UnCLIPPipeline) -> None:
    """Checks that the stages' widths agree with CLIP's (a checkpoint that does not match);
    warns when an 'l2' prior lacks the norm its decoder expects."""
    d = pipe.clip_config.projection_dim
    problems = []
    if pipe.prior_config is not None:
        model_cfg, _ = prior_stage.split_config(pipe.prior_config)
        if model_cfg.get("embed_dim", d) != d:
            problems.append(f"prior embed_dim {model_cfg.get('embed_dim')} != CLIP projection_dim {d}")
        if prior_stage.lacks_l2_norm(pipe.prior_config) and pipe.decoder_config is not None:
            warnings.warn("the prior normalises embeddings to unit length ('l2') and records no "
                          "prior.l2_norm, so the decoder gets unit vectors instead of embeddings "
                          "at the norm it was trained on; re-export the prior with "
                          "`python -m unclip_jax.export` (it measures the norm)", stacklevel=3)
    if pipe.decoder_config is not None:
        proj = decoder_stage.decoder_spec(pipe.decoder_config)["text_proj"]
        if proj.get("clip_embeddings_dim", d) != d:
            problems.append(f"decoder clip_embeddings_dim {proj.get('clip_embeddings_dim')} != "
                            f"CLIP projection_dim {d}")
    if problems:
        raise PipelineError("pipeline stages do not fit together: " + "; ".join(problems))
