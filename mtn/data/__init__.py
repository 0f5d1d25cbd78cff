from mtn.data.corpus import config_files, config_pairs, load_pairs, read_lines, split_train_val

__all__ = ["config_files", "config_pairs", "load_pairs", "read_lines", "split_train_val"]
