"""Datasets by name, batched multi-crop views, and a resumable batch order."""

from attnssl.data.datasets import DatasetNotFoundError, DatasetSpec, ImageDataset, load_dataset
from attnssl.data.views import MultiCropViews

__all__ = ["DatasetNotFoundError", "DatasetSpec", "ImageDataset", "MultiCropViews", "load_dataset"]
