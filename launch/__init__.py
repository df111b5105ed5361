"""Starting training processes: one launcher per node (torchrun, in-process), rendezvous from the SLURM
allocation or a single local machine. `gd-train` and the SLURM scripts go through `launch.local`."""
