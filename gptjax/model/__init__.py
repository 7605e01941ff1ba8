"""The network: configuration, layers, positions and the three model families."""
