"""`python -m camelid.kernels`: build the native kernels ahead of use (`make setup` runs it)."""
import sys

from . import build, cache_dir

module = build(verbose="-v" in sys.argv)
print(f"camelid kernels built ({module.isa()}) in {cache_dir()}")
