"""``python -m easyedit_odedit ...`` = ``odedit ...``; also what torchrun starts:
``torchrun --nproc_per_node N -m easyedit_odedit edit ...``."""
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main

if __name__ == "__main__":
    record(main)(sys.argv[1:])
