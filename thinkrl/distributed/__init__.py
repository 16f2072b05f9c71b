"""Many processes: torch.distributed data parallelism (``torch_dist``); every helper there is a
no-op in a single process, so the trainers call them unconditionally."""
