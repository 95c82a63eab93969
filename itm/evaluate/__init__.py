"""Recall@K evaluation of matchers: metrics, dataset protocols, gallery scoring and ensembles."""
