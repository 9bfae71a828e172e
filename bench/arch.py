"""The benchmarked architecture, once, as diffusers/transformers constructor arguments.

Both sides of every benchmark are built from these dicts: diffusers' UnCLIPPipeline
(``bench/anchor_diffusers_unclip.py`` passes them to the torch constructors) and ours
(``bench/stack.py`` maps them with our converters' config functions,
``unclip_jax.convert.{unet,prior,clip}``), so the two sides cannot drift apart.

``karlo``: Karlo v1.0-alpha (diffusers' ``scripts/convert_kakao_brain_unclip_to_diffusers.py``
configs): prior 1.02B, decoder 0.89B (+ text_proj), two super-res UNets 0.69B each,
CLIP ViT-L/14 text tower 0.12B; 64px decoder, 256px output.
``tiny``: the anchor harness's tiny sizes (CPU smoke runs); its "super-res" keeps 64px.

Pure data: importing this module imports nothing else.
"""

_DECODER_BLOCKS = dict(
    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn")
_SR_BLOCKS = dict(down_block_types=["ResnetDownsampleBlock2D"] * 4,
                  up_block_types=["ResnetUpsampleBlock2D"] * 4)


def _stack(*, emb, heads, head_dim, layers, text, boc, lpb, xattn, ted, dec_head, sr_size):
    return {
        # transformers CLIPTextConfig (model_type clip_text_model), quick_gelu as OpenAI CLIP.
        "text_encoder": dict(model_type="clip_text_model", max_position_embeddings=77,
                             hidden_act="quick_gelu", **text),
        # diffusers PriorTransformer
        "prior": dict(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
                      embedding_dim=emb, num_embeddings=77, additional_embeddings=4, dropout=0.0),
        # diffusers UnCLIPTextProjModel
        "text_proj": dict(clip_extra_context_tokens=4, clip_embeddings_dim=emb, time_embed_dim=ted,
                          cross_attention_dim=xattn),
        # diffusers UNet2DConditionModel (Karlo's decoder)
        "decoder": dict(_class_name="UNet2DConditionModel", sample_size=64, layers_per_block=lpb,
                        block_out_channels=list(boc), in_channels=3, out_channels=6,
                        cross_attention_dim=xattn, attention_head_dim=dec_head, class_embed_type="identity",
                        resnet_time_scale_shift="scale_shift", **_DECODER_BLOCKS),
        # diffusers UNet2DModel (super_res_first and super_res_last are identical)
        "super_res": dict(_class_name="UNet2DModel", sample_size=sr_size, layers_per_block=lpb,
                          block_out_channels=list(boc), in_channels=6, out_channels=3, add_attention=False,
                          **_SR_BLOCKS),
    }


ARCHS = {
    "karlo": _stack(emb=768, heads=32, head_dim=64, layers=20,
                    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                              num_hidden_layers=12, projection_dim=768),
                    boc=(320, 640, 960, 1280), lpb=3, xattn=1536, ted=1280, dec_head=64, sr_size=256),
    "tiny": _stack(emb=32, heads=2, head_dim=8, layers=1,
                   text=dict(vocab_size=200, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                             num_hidden_layers=2, projection_dim=32),
                   boc=(32, 64, 96, 128), lpb=1, xattn=64, ted=128, dec_head=8, sr_size=64),
}

# UnCLIPPipeline defaults (Karlo): steps and guidance of the benchmarked cascade.
SAMPLING = dict(prior_steps=25, decoder_steps=25, super_res_steps=7, prior_guidance=4.0,
                decoder_guidance=8.0, prior_clip_range=5.0)
PROMPT = "a red circle above a blue square"


def arch(size: str) -> dict:
    if size not in ARCHS:
        raise ValueError(f"unknown architecture size {size!r}; known: {', '.join(ARCHS)}")
    return ARCHS[size]


def write_char_vocab(directory: str) -> tuple[str, str]:
    """Writes the benchmark's character-level CLIP vocabulary (``vocab.json``, ``merges.txt``;
    no download) into ``directory``; both sides tokenise with it. Returns the two paths."""
    import json
    import os
    os.makedirs(directory, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n")
    return vocab_path, merges_path
