"""Diffusion from scratch (notebook 07): schedules, networks, training, sampling."""
