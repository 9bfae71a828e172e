"""Flax linen modules, used purely: ``model.apply({'params': p}, ...)``. NHWC images."""
