"""Train a very deep VAE: ``python train.py --hps demo`` (see ``python train.py --help``)."""

import sys

from vdvae_fast.training import main

if __name__ == "__main__":
    sys.exit(main())
