"""Stand-in for the megatron-opd CLI under a real srun: print argv and the launch layout.

tests/test_slurm_launch.py submits slurm/train_opd.sbatch with OPD_LAUNCHER pointing here,
so the production script's srun line runs on the local cluster without a GPU or a model.
"""

import json
import sys

from megatron_opd.distributed import read_launch_env

launch = read_launch_env()
record = {
    "argv": sys.argv[1:],
    "rank": launch.rank,
    "world_size": launch.world_size,
    "local_rank": launch.local_rank,
    "master_addr": launch.master_addr,
    "master_port": launch.master_port,
}
print("LAUNCH " + json.dumps(record), flush=True)
