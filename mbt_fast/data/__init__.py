"""Data: video files -> MBT inputs (PyAV + torch log-mel), a synthetic audio-visual task, augmentations."""
from mbt_fast.data.augment import mixup, sample_mixup_lambda, spec_augment_freq
from mbt_fast.data.dataset import VideoDataset, collate_skip_bad, read_csv, read_folder
from mbt_fast.data.prepared import PreparedDataset, prepare
from mbt_fast.data.sampler import ResumableSampler
from mbt_fast.data.synthetic import SyntheticAVDataset

__all__ = ["VideoDataset", "PreparedDataset", "prepare", "SyntheticAVDataset", "ResumableSampler", "collate_skip_bad", "read_csv",
           "read_folder", "mixup", "sample_mixup_lambda", "spec_augment_freq"]
