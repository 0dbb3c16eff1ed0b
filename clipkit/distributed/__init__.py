"""Process-group set-up. Model code never imports this: the trainer applies parallelism from outside."""
from .env import DistEnv, cleanup, init_distributed

__all__ = ["DistEnv", "cleanup", "init_distributed"]
