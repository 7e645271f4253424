"""`python -m sdlab.training vae|text|unet ...` and `torchrun --nproc_per_node N -m sdlab.training ...`."""

import sys

from ..cli.train import main

sys.exit(main())
