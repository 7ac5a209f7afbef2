"""Building blocks of the models: linear layers with weight loaders, norms, rope, activations."""
