"""`python -m lowbit.bench throughput|serve|kernels ...`, the same as `lowbit bench ...`."""
import sys

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
