"""One module per unCLIP stage (clip, prior, decoder, upsampler): its training objective,
its sampling loop built from ``unclip_jax.diffusion``, its evaluators, and its
registration with the generic trainer. Models know nothing of diffusion; these modules
join the two."""
