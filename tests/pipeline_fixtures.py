"""A tiny random-weight diffusers UnCLIPPipeline (the architecture of diffusers' own deleted
unCLIP test), saved with ``save_pretrained`` as users download Karlo, for end-to-end tests."""

from __future__ import annotations

import os

import numpy as np

WORDS = ["a", "horse", "red", "circle", "photo", "of", "the", "blue", "square", "small", "big"]
TEXT_DIM = 32


def _randomise(module, seed: int, scale: float = 0.05) -> None:
    """Perturbs every parameter, so zero-initialised ones (conv_out, prd_embedding, ...) count."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def build_tiny_diffusers_unclip(tmp_dir: str):
    """Returns (diffusers pipeline, saved directory)."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from unclip_jax.tokenizer import write_word_level_vocab

    torch.manual_seed(0)
    vocab_dir = write_word_level_vocab(WORDS, os.path.join(tmp_dir, "vocab"))
    tokenizer = CLIPTokenizer(os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt"),
                              pad_token="!", model_max_length=77)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=TEXT_DIM, projection_dim=TEXT_DIM, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000))
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=TEXT_DIM, num_layers=1)
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=TEXT_DIM, time_embed_dim=128, cross_attention_dim=100)
    decoder = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity")
    sr_kwargs = dict(sample_size=64, layers_per_block=1, in_channels=6, out_channels=3, block_out_channels=(32, 64),
                     add_attention=False,  # as Karlo's super-res UNets
                     down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                     up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"))
    super_res_first, super_res_last = UNet2DModel(**sr_kwargs), UNet2DModel(**sr_kwargs)
    for i, module in enumerate((text_encoder, prior, text_proj, decoder, super_res_first, super_res_last)):
        _randomise(module, seed=i)
    with torch.no_grad():  # the prior's stored statistics: a real mean and a positive std
        prior.clip_mean.copy_(torch.randn(prior.clip_mean.shape) * 0.1)
        prior.clip_std.copy_(1.0 + torch.rand(prior.clip_std.shape))
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder, tokenizer=tokenizer,
        super_res_first=super_res_first, super_res_last=super_res_last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        num_train_timesteps=1000, clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                          num_train_timesteps=1000),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                            num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    src = os.path.join(tmp_dir, "karlo_tiny")
    pipe.save_pretrained(src)
    return pipe, src


def torch_nchw(x) -> "torch.Tensor":
    import torch
    x = np.asarray(x, np.float32)
    return torch.from_numpy(np.array(np.moveaxis(x, -1, -3) if x.ndim >= 4 else x))  # NHWC -> NCHW
