"""Stable Diffusion fine-tuned with LoRA and QLoRA (notebook 06): pipeline, adapter, data, training, evaluation."""
