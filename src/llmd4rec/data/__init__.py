from .dataset import Dataset, Split, all_positions, leave_one_out, pad_left

__all__ = ["Dataset", "Split", "all_positions", "leave_one_out", "pad_left"]
