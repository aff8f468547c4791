"""Load a recipe with its overrides as ``addertrain launch`` does; exit 2 with its message if bad.

    python check_recipe.py RECIPE [key.path=value ...]

submit.sh runs it before queueing and addertrain.sbatch before starting Ray, so a typo costs
neither a queue wait nor a cluster start.
"""

import sys

from addertrain import config
from addertrain.errors import UserError

try:
    config.load(sys.argv[1], sys.argv[2:])
except UserError as e:
    sys.exit(f"addertrain: error: {e}")
