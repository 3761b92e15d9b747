"""mcf: Mask Contrastive Face pre-training (ACM MM 2023), industrialised."""

__version__ = "0.1.0"
