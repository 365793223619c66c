"""Neural style transfer (notebook 03): Gatys et al. 2016 and multi-modal stylisation by deep feature perturbation."""
