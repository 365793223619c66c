"""The fully-connected GAN of notebooks 01 and 02 (MNIST, FashionMNIST): model, training loop, CUDA graph, figures."""
