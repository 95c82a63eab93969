"""Datasets: sources (synthetic, Flickr30K, COCO), download, records and captions."""
