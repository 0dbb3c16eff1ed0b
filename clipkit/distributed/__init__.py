"""Process groups and collectives. Model code never imports this: the trainer applies parallelism."""
from .env import DistEnv, cleanup, gather_objects, init_distributed, resolve_device
from .gather import all_gather_with_grad, world_info

__all__ = ["DistEnv", "all_gather_with_grad", "cleanup", "gather_objects", "init_distributed", "resolve_device",
           "world_info"]
