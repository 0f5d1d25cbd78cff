from mtn.data.corpus import load_pairs, read_lines, split_train_val

__all__ = ["load_pairs", "read_lines", "split_train_val"]
