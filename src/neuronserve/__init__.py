"""neuronserve: compile Hugging Face encoders for AWS Inferentia or CPU and serve them fast."""

__version__ = "0.1.0"
