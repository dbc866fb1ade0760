"""Vision models and data for pruning experiments: Fashion-MNIST, a DeiT-style ViT, a ResNet."""
