"""Running thinkrl across processes: rollout workers and a learner on Ray (``ray_*.py``,
docs/distributed-ray.md) and data-parallel training under torchrun (``torch_dist.py``)."""
