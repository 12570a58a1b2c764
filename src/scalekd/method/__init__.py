"""The method of the paper: CAP projectors, the two views (phi / DCT), distances, feature mimicking, the proxy path, options.

Imports torch and timm only."""
