"""Bottom-up region features: the BUTD Faster R-CNN, its weights, training, extraction and selection."""
