"""Diffusion models from scratch on MNIST."""
