"""`PYTHONPATH=. python tests/counted_train.py FLAGS` runs `python train.py FLAGS`, then prints one line,
`rank R: N optimizer steps`, for the subprocess resume tests (under torchrun each rank prints its own).
Every random draw is a function of (seed, step), so a run that silently started again from step 0
ends with the same weights as one that resumed; it does not end with the same number of steps."""

import os
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

import train

steps = []
register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(1))
train.main(sys.argv[1:])
print(f"rank {os.environ.get('RANK', 0)}: {len(steps)} optimizer steps", flush=True)
