from mcf.losses.contrastive import ContrastiveLoss
from mcf.losses.perceptual import PerceptualLoss
from mcf.losses.pixel import pixel_loss

__all__ = ["ContrastiveLoss", "PerceptualLoss", "pixel_loss"]
