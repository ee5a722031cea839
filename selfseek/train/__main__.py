"""`python -m selfseek.train {pretrain,sft,grpo,export,make-data} ...` (works under torchrun)."""

import sys

from selfseek.train.cli import main

sys.exit(main())
