"""Pix2PixHD (notebook 05): label maps to photos with a coarse-to-fine generator and multi-scale PatchGANs."""
