"""`python -m mla_ext` (also `make demo`): see mla_ext/demo.py."""
import sys

from .demo import main

sys.exit(main())
