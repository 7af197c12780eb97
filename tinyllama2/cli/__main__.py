"""`python -m tinyllama2.cli ...`: bench runs each combination this way, in a process of its own."""
import sys

from . import main

sys.exit(main())
