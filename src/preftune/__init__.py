"""preftune: preference tuning (DPO and relatives) that is correct, fast and honest about results."""

__version__ = "0.1.0"


def train(config, overrides=None):
    """Run a DPO training job from a TrainConfig, a flat dict or a YAML path; returns the summary."""
    from preftune.training import train as _train

    return _train(config, overrides)


__all__ = ["train", "__version__"]
