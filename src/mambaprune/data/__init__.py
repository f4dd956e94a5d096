"""Datasets: readers for the public formats (one registry) and the SynthVQA generator."""
from .readers import Sample, available_datasets, load_dataset, register_dataset, resolve_dataset
from .synthvqa import SynthConfig, generate_synthvqa

__all__ = ["Sample", "SynthConfig", "available_datasets", "generate_synthvqa", "load_dataset", "register_dataset",
           "resolve_dataset"]
