from .dataset import Dataset, Split, all_positions, leave_one_out, pad_left
from .registry import dataset_names, load_dataset

__all__ = ["Dataset", "Split", "all_positions", "dataset_names", "leave_one_out", "load_dataset", "pad_left"]
