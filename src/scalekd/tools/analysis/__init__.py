"""Analysis tools: the feature spectrum (Fig. 2 / 5), feature distances (Fig. 3 / 6), linear probing (Table 12)."""
from .feature_distance import feature_distances, plot_feature_distances, task_from_checkpoint
from .inputs import feature_maps, image_dataset
from .linear_probe import linear_probe
from .spectrum import feature_spectrum, plot_spectrum

__all__ = ['feature_maps', 'image_dataset', 'feature_spectrum', 'plot_spectrum', 'linear_probe',
           'feature_distances', 'plot_feature_distances', 'task_from_checkpoint']
