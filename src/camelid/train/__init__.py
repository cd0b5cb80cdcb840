"""`camelid train`, in the order a run goes: options.py (TrainConfig, the options file, checks that need no
model), distributed.py (rank, device, FSDP2), schedule.py (row order, learning rate), loss.py (loss of packed
rows, gradient norm), run.py (the output folder, log and plot), loop.py (`train`: setting up and the steps).

Nothing is imported here, so `camelid train --help` reads options.py without importing torch.
"""
