"""preftune: preference tuning (DPO and relatives) that is correct, fast and honest about results."""

__version__ = "0.1.0"


def train(config, overrides=None, *, allow_code=False):
    """Run a DPO training job from a TrainConfig, a flat dict or a YAML path; returns the summary.
    ``allow_code``: let a YAML file run code (trust_remote_code, a generate line's module:function reward)."""
    from preftune.training import train as _train

    return _train(config, overrides, allow_code=allow_code)


__all__ = ["train", "__version__"]
