"""Cross-modal alignment model (per-modality linear heads into a shared space) and its trainer."""

from service.alignment.evaluate import retrieval_recall
from service.alignment.model import AlignmentModel
from service.alignment.trainer import AlignmentTrainer, TrainerConfig

__all__ = ["AlignmentModel", "AlignmentTrainer", "TrainerConfig", "retrieval_recall"]
