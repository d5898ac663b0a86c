"""Training: Scenic's MBT recipe, exact-resume checkpoints, DDP via torchrun, metrics, the demo."""
from mbt_fast.train.checkpoint import load_model_from_checkpoint, read_checkpoint, save_checkpoint
from mbt_fast.train.losses import classification_loss, sigmoid_bce, smooth_targets, softmax_ce
from mbt_fast.train.metrics import average_precision, mean_average_precision, topk_accuracy
from mbt_fast.train.schedule import compound_lr
from mbt_fast.train.trainer import TrainConfig, evaluate, plot_curves, train

__all__ = ["TrainConfig", "train", "evaluate", "plot_curves", "compound_lr", "classification_loss", "sigmoid_bce",
           "softmax_ce", "smooth_targets", "average_precision", "mean_average_precision", "topk_accuracy",
           "save_checkpoint", "read_checkpoint", "load_model_from_checkpoint"]
