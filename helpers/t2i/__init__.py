"""Text-to-image GAN (Reed et al. 2016), notebook 04: text encoder, captioned data, DCGAN, training, evaluation."""
