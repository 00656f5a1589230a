"""wildssl: self-supervised and weakly-supervised ViT pre-training on images found in the wild."""

__version__ = "0.1.0"


def load_encoder(checkpoint_or_export, teacher: bool | None = None):
    """Load a trained encoder (an ``nn.Module`` with ``forward_features``) from a run directory,
    a checkpoint file or an export. See :func:`wildssl.models.loading.load_encoder`."""
    from wildssl.models.loading import load_encoder as _load

    return _load(checkpoint_or_export, teacher=teacher)


__all__ = ["__version__", "load_encoder"]
